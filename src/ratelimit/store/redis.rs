use std::{sync::LazyLock, time::Duration};

use redis::{Script, Value};

use super::{Blocks, Check, Decision, RateLimitStore, StoreError};
use crate::{
    backend::RedisBackend,
    ratelimit::{
        Algorithm, Answer,
        algorithm::{Counted, Judged},
    },
    time::unix_micros,
};

mod feed;

/// One algorithm's script, as it is loaded: after the common prelude, and for a policy with a
/// penalty, wrapped into the function that `penalty.lua` calls.
macro_rules! scripts {
    ($($plain:ident, $penalized:ident = $file:literal;)*) => {$(
        static $plain: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(include_str!("lua/prelude.lua"), include_str!($file)))
        });
        static $penalized: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/prelude.lua"),
                "local function decide()\n",
                include_str!($file),
                "\nend\n",
                include_str!("lua/penalty.lua")
            ))
        });
    )*};
}

scripts! {
    SLIDING_WINDOW, PENALIZED_SLIDING_WINDOW = "lua/sliding_window.lua";
    SLIDING_LOG, PENALIZED_SLIDING_LOG = "lua/sliding_log.lua";
    GCRA, PENALIZED_GCRA = "lua/gcra.lua";
}

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

impl RedisRateStore {
    /// The script that decides `check`, with its keys and arguments.
    fn invocation(&self, check: &Check, limit: u64) -> redis::ScriptInvocation<'static> {
        let penalized = check.penalty.is_some();
        let script = match (check.algorithm, penalized) {
            (Algorithm::SlidingWindow, false) => &*SLIDING_WINDOW,
            (Algorithm::SlidingLog, false) => &*SLIDING_LOG,
            (Algorithm::Gcra, false) => &*GCRA,
            (Algorithm::SlidingWindow, true) => &*PENALIZED_SLIDING_WINDOW,
            (Algorithm::SlidingLog, true) => &*PENALIZED_SLIDING_LOG,
            (Algorithm::Gcra, true) => &*PENALIZED_GCRA,
        };
        let mut invocation = match check.penalty {
            None => script.key(format!("{}{}", self.prefix, check.key)),
            Some(_) => {
                let counter = format!("{}{{{}}}", self.prefix, check.key);
                let mut invocation = script.key(&counter);
                invocation.key(counter + ":penalty");
                invocation
            }
        };
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
        if let Some(penalty) = check.penalty {
            let terms = penalty.terms(check.quota);
            invocation
                .arg(terms.strikes)
                .arg(terms.block)
                .arg(terms.max_block)
                .arg(terms.quiet);
        }
        invocation
    }
}

impl RateLimitStore for RedisRateStore {
    /// One round trip: the algorithm's script on the key `{prefix}{key}` (for a check under a
    /// penalty, `{prefix}{{key}}` and `{prefix}{{key}}:penalty`, one Cluster slot). A check
    /// that places a block announces it in a second round trip.
    fn check(&self, check: &Check) -> Answer<Result<Decision, StoreError>> {
        let limit = check.quota.limit();
        if limit == 0 {
            // Denied for good, whatever the key holds: no need to ask Redis.
            return Answer::ready(Ok(Decision::denied(0, 0, Duration::ZERO, None)));
        }
        let invocation = self.invocation(check, limit);
        let (backend, timeout) = (self.backend.clone(), self.timeout);
        // Who announces a block this check places. A block placed on a trace's time means
        // nothing to other instances' clocks.
        let announcer = (check.penalty.is_some() && check.at.is_none())
            .then(|| (self.clone(), check.key.clone()));
        Answer::later(async move {
            let reply: Value = backend
                .run(timeout, |mut conn| async move {
                    invocation.invoke_async(&mut conn).await
                })
                .await
                .map_err(StoreError::from)?;
            let judged = read_reply(&reply, limit)?;
            if let (Some((store, key)), Some(until)) = (announcer, judged.new_block_until) {
                store.announce(&key, limit, until).await;
            }
            Ok(judged.counted.into_decision(limit))
        })
    }

    /// Shared: every instance on this Redis sees the same counts.
    fn is_shared(&self) -> bool {
        true
    }

    /// One round trip: the entries of the stream `{prefix}blocks` past `cursor`, with Redis's
    /// time to tell how long each block still holds.
    fn blocks_since(&self, cursor: Option<&str>) -> Answer<Result<Blocks, StoreError>> {
        let (store, cursor) = (self.clone(), cursor.map(str::to_owned));
        Answer::later(async move { store.read_blocks(cursor).await })
    }
}

/// The decision a script's reply stands for. The scripts answer `{allowed, remaining, reset,
/// retry}` (times in µs, a retry of `-1` for none), and under a penalty two more numbers:
/// `1` when refused by a block, and when a block this check placed ends (µs, `0` for none). A
/// reply of any other shape is an error, which the layer handles as any failed check. A
/// remaining count past the limit is held to it, and a negative wait reads as none.
pub(crate) fn read_reply(reply: &Value, limit: u64) -> Result<Judged, StoreError> {
    let numbers: Vec<i64> =
        redis::from_redis_value_ref(reply).map_err(|error| unexpected(&error))?;
    let (allowed, remaining, reset, retry, blocked, until) = match numbers[..] {
        [allowed, remaining, reset, retry] => (allowed, remaining, reset, retry, 0, 0),
        [allowed, remaining, reset, retry, blocked, until] => {
            (allowed, remaining, reset, retry, blocked, until)
        }
        _ => return Err(unexpected(&format!("{} numbers", numbers.len()))),
    };
    let wait = |us: i64| u64::try_from(us).unwrap_or(0);
    let refused = allowed != 1;
    Ok(Judged {
        counted: Counted {
            allowed: !refused,
            remaining: u64::try_from(remaining).unwrap_or(0).min(limit),
            reset: wait(reset),
            retry: (refused && retry >= 0).then(|| wait(retry)),
            blocked: refused && blocked == 1,
        },
        new_block_until: (refused && until > 0).then(|| wait(until)),
    })
}

fn unexpected(error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Failed {
        source: format!("unexpected rate-limit script reply: {error}").into(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use redis::Value;

    use super::read_reply;
    use crate::ratelimit::headers::{ratelimit_value, retry_after_secs};

    /// Any reply RESP2 or RESP3 can carry, nested a few levels.
    fn any_reply() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            Just(Value::Okay),
            any::<i64>().prop_map(Value::Int),
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string().into_bytes()),
                proptest::collection::vec(any::<u8>(), 0..24),
            ]
            .prop_map(Value::BulkString),
            "[ -~]{0,12}".prop_map(Value::SimpleString),
            any::<f64>().prop_map(Value::Double),
            any::<bool>().prop_map(Value::Boolean),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Set),
                proptest::collection::vec((inner.clone(), inner), 0..3).prop_map(Value::Map),
            ]
        })
    }

    /// Four integers, as the scripts answer, but with any values: what a corrupted key or a
    /// foreign script could make them say.
    fn four_numbers() -> impl Strategy<Value = (Value, [i64; 4])> {
        proptest::array::uniform4(prop_oneof![any::<i64>(), -1i64..=1, 0i64..200_000_000])
            .prop_flat_map(|numbers| {
                let as_text = any::<bool>();
                (as_text, Just(numbers)).prop_map(|(as_text, numbers)| {
                    let items = numbers
                        .iter()
                        .map(|&n| {
                            if as_text {
                                Value::BulkString(n.to_string().into_bytes())
                            } else {
                                Value::Int(n)
                            }
                        })
                        .collect();
                    (Value::Array(items), numbers)
                })
            })
    }

    proptest! {
        /// Whatever Redis answers, reading it never panics, and a decision read from it stays
        /// within the quota, and makes valid headers.
        #[test]
        fn any_reply_reads_as_a_bounded_decision_or_an_error(
            reply in any_reply(),
            limit in 0u64..1_000_000,
        ) {
            if let Ok(judged) = read_reply(&reply, limit) {
                let counted = judged.counted;
                prop_assert!(counted.remaining <= limit);
                prop_assert!(!(counted.allowed && counted.retry.is_some()));
                let decision = counted.into_decision(limit);
                prop_assert!(ratelimit_value("p", &decision).to_str().is_ok());
                if let Some(wait) = decision.retry_after {
                    prop_assert!(retry_after_secs(wait) >= 1);
                }
            }
        }

        /// A reply of four integers always reads, and says exactly what its numbers say where
        /// they are in range: allowed only for `1`, the remaining count, the reset and retry.
        #[test]
        fn four_integers_read_as_what_they_say(
            (reply, [allowed, remaining, reset, retry]) in four_numbers(),
            limit in 1u64..1_000_000,
        ) {
            let counted = read_reply(&reply, limit).expect("four integers read").counted;
            prop_assert_eq!(counted.allowed, allowed == 1);
            let non_negative = |n: i64| u64::try_from(n).unwrap_or(0);
            prop_assert_eq!(counted.remaining, non_negative(remaining).min(limit));
            prop_assert_eq!(counted.reset, non_negative(reset));
            let expected_retry = (allowed != 1 && retry >= 0).then(|| non_negative(retry));
            prop_assert_eq!(counted.retry, expected_retry);
        }

        /// Other than four or six parts, or a part that is no integer, is an error, never a
        /// decision made up from what is there.
        #[test]
        fn other_shapes_are_errors(
            parts in proptest::collection::vec(any::<i64>(), 0..8),
            text in "[a-z]{1,6}",
            at in 0usize..4,
        ) {
            let ints = |parts: &[i64]| Value::Array(parts.iter().map(|&n| Value::Int(n)).collect());
            if parts.len() != 4 && parts.len() != 6 {
                prop_assert!(read_reply(&ints(&parts), 10).is_err());
            }
            let mut four = [0i64; 4].map(Value::Int).to_vec();
            four[at] = Value::BulkString(text.into_bytes());
            prop_assert!(read_reply(&Value::Array(four), 10).is_err());
            prop_assert!(read_reply(&Value::Nil, 10).is_err());
        }
    }
}
