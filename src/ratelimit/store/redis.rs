use std::{
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use redis::{Script, Value};

use super::{Blocks, Check, Decision, RateLimitStore, Settlement, StoreError};
use crate::{
    backend::RedisBackend,
    ratelimit::{Algorithm, Answer, algorithm::Counted},
    time::{from_unix_micros, unix_micros},
};

mod feed;

/// One algorithm's scripts, as they are loaded, each after the common prelude: the algorithm
/// alone, answering its reply text at once (`answer.lua`); or made the function `decide`,
/// answering its four numbers, then `penalty.lua` (for a policy with a penalty) or, with the
/// algorithm's `refund`, `settle.lua`.
macro_rules! scripts {
    ($($name:ident = $file:literal, $refund:literal;)*) => {$(
        static $name: LazyLock<Scripts> = LazyLock::new(|| {
            let decide = concat!(
                include_str!("lua/prelude.lua"),
                "local function answer(...) return {...} end\n",
                "local function decide()\n",
                include_str!($file),
                "\nend\n",
            );
            Scripts {
                plain: Script::new(concat!(
                    include_str!("lua/prelude.lua"),
                    include_str!("lua/answer.lua"),
                    include_str!($file)
                )),
                penalized: Script::new(&format!("{decide}{}", include_str!("lua/penalty.lua"))),
                settle: Script::new(&format!(
                    "{decide}{}{}",
                    include_str!($refund),
                    include_str!("lua/settle.lua")
                )),
            }
        });
    )*};
}

/// The scripts of one algorithm.
struct Scripts {
    plain: Script,
    penalized: Script,
    settle: Script,
}

scripts! {
    SLIDING_WINDOW = "lua/sliding_window.lua", "lua/refund_window.lua";
    SLIDING_LOG = "lua/sliding_log.lua", "lua/refund_log.lua";
    GCRA = "lua/gcra.lua", "lua/refund_gcra.lua";
}

impl Scripts {
    fn of(algorithm: Algorithm) -> &'static Self {
        match algorithm {
            Algorithm::SlidingWindow => &SLIDING_WINDOW,
            Algorithm::SlidingLog => &SLIDING_LOG,
            Algorithm::Gcra => &GCRA,
        }
    }
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
/// checked with another fails (Redis answers `WRONGTYPE`). Under a [`Penalty`](crate::ratelimit::Penalty)
/// the counter is `{prefix}{{key}}` (a hash tag) with the key's offences in
/// `{prefix}{{key}}:penalty`, one Cluster slot, and each block placed is announced on the
/// stream `{prefix}blocks` (capped at about 10 000 entries), which
/// [`blocks_since`](RateLimitStore::blocks_since) reads. A
/// [`Settlement`](crate::ratelimit::Settlement) is one script on the counter.
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
    /// The Redis key of `check`'s counter: `{prefix}{key}`, or under a penalty
    /// `{prefix}{{key}}`, a hash tag that puts the penalty's key in the same Cluster slot.
    fn counter_key(&self, check: &Check) -> String {
        match check.penalty {
            None => format!("{}{}", self.prefix, check.key),
            Some(_) => format!("{}{{{}}}", self.prefix, check.key),
        }
    }

    /// One round trip that runs `invocation`, under the store's deadline; it owns what it needs.
    fn run(
        &self,
        invocation: redis::ScriptInvocation<'static>,
    ) -> impl Future<Output = Result<Value, StoreError>> + Send + 'static {
        let (backend, timeout) = (self.backend.clone(), self.timeout);
        async move {
            backend
                .run(timeout, |mut conn| async move {
                    invocation.invoke_async(&mut conn).await
                })
                .await
                .map_err(StoreError::from)
        }
    }

    /// The script that decides `check`, with its keys and arguments.
    fn invocation(&self, check: &Check, limit: u64) -> redis::ScriptInvocation<'static> {
        let scripts = Scripts::of(check.algorithm);
        let mut invocation = match check.penalty {
            None => scripts.plain.key(self.counter_key(check)),
            Some(_) => {
                let counter = self.counter_key(check);
                let mut invocation = scripts.penalized.key(&counter);
                invocation.key(counter + ":penalty");
                invocation
            }
        };
        invocation
            .arg(explicit_time(check.at))
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
        let reply = self.run(self.invocation(check, limit));
        // Who announces a block this check places. A block placed on a trace's time means
        // nothing to other instances' clocks.
        let announcer = (check.penalty.is_some() && check.at.is_none())
            .then(|| (self.clone(), check.key.clone()));
        Answer::later(async move {
            let read = read_reply(&reply.await?, limit)?;
            if let (Some((store, key)), Some(until)) = (announcer, read.new_block_until) {
                store.announce(&key, limit, until).await;
            }
            let mut decision = read.counted.into_decision(limit);
            decision.at = read.at.map(from_unix_micros);
            Ok(decision)
        })
    }

    /// One round trip: the algorithm's settlement script on the check's counter key.
    fn settle(&self, settlement: &Settlement) -> Answer<Result<Decision, StoreError>> {
        let check = &settlement.check;
        let limit = check.quota.limit();
        if limit == 0 {
            return Answer::ready(Ok(Decision::allowed(0, 0, Duration::ZERO)));
        }
        let mut invocation = Scripts::of(check.algorithm)
            .settle
            .key(self.counter_key(check));
        invocation
            .arg(explicit_time(settlement.at))
            .arg(check.quota.window_ms() * 1000)
            .arg(limit)
            .arg(check.cost)
            .arg(settlement.actual)
            .arg(unix_micros(settlement.reserved_at));
        let reply = self.run(invocation);
        Answer::later(async move {
            Ok(read_reply(&reply.await?, limit)?
                .counted
                .into_decision(limit))
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

/// A time for the scripts' first argument: empty makes them read Redis `TIME`.
fn explicit_time(at: Option<SystemTime>) -> String {
    at.map(unix_micros)
        .map_or_else(String::new, |at| at.to_string())
}

/// What a script's reply says: the decision, a block it placed, and when it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) counted: Counted,
    /// When a block this check placed ends (µs since the epoch).
    pub(crate) new_block_until: Option<u64>,
    /// The decision's time (µs since the epoch, Redis's clock unless the check named one).
    pub(crate) at: Option<u64>,
}

/// The decision a script's reply stands for. Every script answers one text of seven integers
/// separated by spaces, `allowed remaining reset retry blocked block_end time`: times in µs,
/// a retry of `-1` for none, `blocked` 1 when refused by a penalty block, the end of a block
/// this check placed (`0` for none), and the decision's time (`0` for none: a settlement, a
/// limit of 0). One bulk reply costs the client a fraction of what an array of seven does to
/// read. A reply of any other shape is an error, which the layer handles as any failed check.
/// A remaining count past the limit is held to it, and a negative wait or time reads as none.
pub(crate) fn read_reply(reply: &Value, limit: u64) -> Result<Reply, StoreError> {
    let Value::BulkString(text) = reply else {
        return Err(unexpected(&"not a text"));
    };
    let text = std::str::from_utf8(text).map_err(|error| unexpected(&error))?;
    let mut parts = text.split(' ');
    let mut numbers = [0i64; 7];
    for number in &mut numbers {
        *number = parts
            .next()
            .and_then(|part| part.parse().ok())
            .ok_or_else(|| unexpected(&format!("{text:?} is not seven integers")))?;
    }
    if parts.next().is_some() {
        return Err(unexpected(&format!("{text:?} is not seven integers")));
    }
    let [allowed, remaining, reset, retry, blocked, until, at] = numbers;
    let wait = |us: i64| u64::try_from(us).unwrap_or(0);
    let refused = allowed != 1;
    Ok(Reply {
        counted: Counted {
            allowed: !refused,
            remaining: u64::try_from(remaining).unwrap_or(0).min(limit),
            reset: wait(reset),
            retry: (refused && retry >= 0).then(|| wait(retry)),
            blocked: refused && blocked == 1,
        },
        new_block_until: (refused && until > 0).then(|| wait(until)),
        at: (at > 0).then(|| wait(at)),
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

    /// Seven integers, as the scripts answer, but with any values: what a corrupted key or a
    /// foreign script could make them say.
    fn seven_numbers() -> impl Strategy<Value = (Value, [i64; 7])> {
        proptest::array::uniform7(prop_oneof![any::<i64>(), -1i64..=1, 0i64..200_000_000])
            .prop_map(|numbers| (text(&numbers), numbers))
    }

    fn text(numbers: &[i64]) -> Value {
        let parts: Vec<String> = numbers.iter().map(i64::to_string).collect();
        Value::BulkString(parts.join(" ").into_bytes())
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

        /// A reply of seven integers always reads, and says exactly what its numbers say
        /// where they are in range: allowed only for `1`, the remaining count, the reset and
        /// retry, a block, and the time.
        #[test]
        fn seven_integers_read_as_what_they_say(
            (reply, [allowed, remaining, reset, retry, blocked, until, at]) in seven_numbers(),
            limit in 1u64..1_000_000,
        ) {
            let read = read_reply(&reply, limit).expect("seven integers read");
            let counted = read.counted;
            prop_assert_eq!(counted.allowed, allowed == 1);
            let non_negative = |n: i64| u64::try_from(n).unwrap_or(0);
            prop_assert_eq!(counted.remaining, non_negative(remaining).min(limit));
            prop_assert_eq!(counted.reset, non_negative(reset));
            let expected_retry = (allowed != 1 && retry >= 0).then(|| non_negative(retry));
            prop_assert_eq!(counted.retry, expected_retry);
            prop_assert_eq!(counted.blocked, allowed != 1 && blocked == 1);
            let placed = (allowed != 1 && until > 0).then(|| non_negative(until));
            prop_assert_eq!(read.new_block_until, placed);
            prop_assert_eq!(read.at, (at > 0).then(|| non_negative(at)));
        }

        /// Other than seven integers in one text, or a part that is no integer, is an error,
        /// never a decision made up from what is there: fewer or more parts, an array of the
        /// numbers, a word among them.
        #[test]
        fn other_shapes_are_errors(
            parts in proptest::collection::vec(any::<i64>(), 0..9),
            word in "[a-z]{1,6}",
            at in 0usize..7,
        ) {
            if parts.len() != 7 {
                prop_assert!(read_reply(&text(&parts), 10).is_err());
            }
            let ints = Value::Array(parts.iter().map(|&n| Value::Int(n)).collect());
            prop_assert!(read_reply(&ints, 10).is_err());
            let mut seven: Vec<String> = [0i64; 7].iter().map(i64::to_string).collect();
            seven[at] = word;
            prop_assert!(read_reply(&Value::BulkString(seven.join(" ").into_bytes()), 10).is_err());
            prop_assert!(read_reply(&Value::Nil, 10).is_err());
        }
    }
}
