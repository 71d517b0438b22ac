//! The rate-limit stores: the same decisions from memory and Redis for one trace, exact counts
//! across instances, time from Redis, retry-after values, and a bounded memory store.
//!
//! Redis tests spawn their own `redis-server` (see `support`), and print SKIPPED without one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{
        Algorithm, Check, CounterKey, Decision, MemoryRateStore, Penalty, Quota, RateLimitStore,
        RedisRateStore,
    },
};

use crate::support::{RedisCluster, RedisServer};

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::SlidingWindow,
    Algorithm::SlidingLog,
    Algorithm::Gcra,
];

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);

/// A Redis store on its own backend (its own connection and breaker), as another instance has.
/// The deadline is generous: these tests are about counts, not latency, and must not fail on a
/// busy machine.
fn redis_store(server: &RedisServer) -> RedisRateStore {
    let backend = RedisBackend::new(&server.url()).expect("backend");
    RedisRateStore::new(backend).with_timeout(Duration::from_secs(2))
}

/// A time on a whole-second boundary (so on a window boundary of every window used here).
fn epoch_second(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Redis's own clock, in microseconds since the epoch.
fn redis_time(server: &RedisServer) -> u64 {
    let reply = server.cli(&["TIME"]);
    let mut parts = reply.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    parts.next().unwrap() * 1_000_000 + parts.next().unwrap()
}

async fn decide(store: &dyn RateLimitStore, check: impl std::borrow::Borrow<Check>) -> Decision {
    store
        .check(check.borrow())
        .await
        .expect("the store answers")
}

// ---------------------------------------------------------------------------------------------
// Exactness across instances
// ---------------------------------------------------------------------------------------------

/// Runs `tasks` concurrent checks of cost 1 on one key, spread over `stores`, and returns how
/// many were allowed.
async fn concurrent_allowed(
    stores: &[Arc<dyn RateLimitStore>],
    key: &str,
    quota: Quota,
    algorithm: Algorithm,
    tasks: usize,
) -> usize {
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = Arc::clone(&stores[task % stores.len()]);
        let key = key.to_owned();
        handles.push(tokio::spawn(async move {
            let check = Check::new(&key, quota, algorithm, 1);
            store
                .check(&check)
                .await
                .expect("the store answers")
                .allowed
        }));
    }
    let mut allowed = 0;
    for handle in handles {
        allowed += usize::from(handle.await.unwrap());
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_redis_instances_grant_exactly_the_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let stores: Vec<Arc<dyn RateLimitStore>> = (0..4)
        .map(|_| Arc::new(redis_store(&server)) as Arc<dyn RateLimitStore>)
        .collect();
    // An hour-long window: nothing is replenished while the 400 checks run (GCRA frees one
    // unit every 36 s).
    let quota = Quota::per_hour(100);
    for algorithm in ALGORITHMS {
        let key = format!("exact:{}", algorithm.as_str());
        let allowed = concurrent_allowed(&stores, &key, quota, algorithm, 400).await;
        assert_eq!(allowed, 100, "{algorithm:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_on_a_cluster_grant_exactly_the_limit() {
    let Some(cluster) = RedisCluster::start_masters_only() else {
        return;
    };
    let stores: Vec<Arc<dyn RateLimitStore>> = (0..4)
        .map(|_| {
            let backend = RedisBackend::cluster(cluster.urls()).expect("backend");
            Arc::new(RedisRateStore::new(backend).with_timeout(Duration::from_secs(2)))
                as Arc<dyn RateLimitStore>
        })
        .collect();
    let quota = Quota::per_hour(100);
    // Keys on every master: each decision goes to the node of its key's slot.
    for algorithm in ALGORITHMS {
        for n in 0..6 {
            let key = format!("exact:{}:{n}", algorithm.as_str());
            let allowed = concurrent_allowed(&stores, &key, quota, algorithm, 150).await;
            assert_eq!(allowed, 100, "{algorithm:?} {key}");
        }
    }
    let spread = cluster.keys_per_master();
    assert!(
        spread.iter().all(|&keys| keys > 0),
        "keys per master: {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clones_of_one_memory_store_grant_exactly_the_limit() {
    let store = MemoryRateStore::new();
    let stores: Vec<Arc<dyn RateLimitStore>> = (0..4)
        .map(|_| Arc::new(store.clone()) as Arc<dyn RateLimitStore>)
        .collect();
    for algorithm in ALGORITHMS {
        let key = format!("exact:{}", algorithm.as_str());
        let allowed = concurrent_allowed(&stores, &key, Quota::per_hour(100), algorithm, 400).await;
        assert_eq!(allowed, 100, "{algorithm:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Time from Redis
// ---------------------------------------------------------------------------------------------

/// Without `Check::at` the store sends an empty time, and what the script stores is stamped
/// with Redis `TIME`, read between two `TIME` calls of our own.
#[tokio::test]
async fn without_an_explicit_time_the_scripts_read_redis_time() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server);
    let quota = Quota::per_hour(100);
    for algorithm in ALGORITHMS {
        // Load the script first, so MONITOR sees the EVALSHA alone.
        let warm_up = format!("warm-up:{}", algorithm.as_str());
        decide(&store, Check::new(&warm_up, quota, algorithm, 1)).await;
        let key = format!("clock:{}", algorithm.as_str());
        let monitor = server.monitor();
        let before = redis_time(&server);
        let decision = decide(&store, Check::new(&key, quota, algorithm, 1)).await;
        let after = redis_time(&server);

        let sent = monitor.take();
        let call = sent
            .iter()
            .find(|line| line.starts_with("EVALSHA") && line.contains(&key))
            .unwrap_or_else(|| panic!("no EVALSHA in {sent:?}"));
        // KEYS[1], then an empty ARGV[1] (MONITOR's quotes are stripped), then the window.
        assert!(
            call.contains(&format!(
                "turnstile:{}  3600000000 100 1",
                CounterKey::from(&key)
            )),
            "{call}"
        );

        let redis_key = format!("turnstile:{}", CounterKey::from(&key));
        let stamped = match algorithm {
            Algorithm::SlidingLog => {
                let reply = server.cli(&["ZRANGE", &redis_key, "0", "-1", "WITHSCORES"]);
                reply.lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
            }
            // The TAT is one emission interval (36 s) past the decision time.
            Algorithm::Gcra => {
                server
                    .cli(&["GET", &redis_key])
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    - 36_000_000
            }
            // The window index, and the reset (the end of the next window) measured from the
            // decision time, give the decision time back to the microsecond.
            _ => {
                let index: u64 = server
                    .cli(&["HGET", &redis_key, "w"])
                    .trim()
                    .parse()
                    .unwrap();
                let window = 3_600_000_000;
                let reset = u64::try_from(decision.reset.as_micros()).unwrap();
                index * window + 2 * window - reset
            }
        };
        assert!(
            (before..=after).contains(&stamped),
            "{algorithm:?}: stamped {stamped}, Redis time [{before}, {after}]"
        );
    }
}

/// Two instances whose clocks are a minute apart. Had the stores used the instances' clocks
/// (as `Check::at` makes them do), the fast one would see the slow one's spending as long gone
/// and grant the limit a second time. Without `at` the time is Redis's: they agree on every
/// count and on the wait.
#[tokio::test]
async fn instances_with_skewed_clocks_agree() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (slow, fast) = (redis_store(&server), redis_store(&server));
    let quota = Quota::new(10, Duration::from_secs(10)).unwrap();
    for algorithm in ALGORITHMS {
        let now = SystemTime::now();
        let (slow_clock, fast_clock) =
            (now - Duration::from_secs(30), now + Duration::from_secs(30));

        // What trusting the instances' clocks would do.
        let key = format!("skewed:{}", algorithm.as_str());
        let check = Check::new(&key, quota, algorithm, 10);
        assert!(decide(&slow, check.clone().at(slow_clock)).await.allowed);
        assert!(
            decide(&fast, check.at(fast_clock)).await.allowed,
            "{algorithm:?}: the hazard this test is about did not show"
        );

        // What the stores do: one clock, Redis's.
        let key = format!("redis-time:{}", algorithm.as_str());
        let spend = decide(&slow, Check::new(&key, quota, algorithm, 10)).await;
        assert!(spend.allowed);
        let one_more = Check::new(&key, quota, algorithm, 1);
        let (from_fast, from_slow) = (
            decide(&fast, &one_more).await,
            decide(&slow, &one_more).await,
        );
        for seen in [from_fast, from_slow] {
            assert!(!seen.allowed, "{algorithm:?}: {seen:?}");
            assert_eq!(seen.remaining, 0);
            assert!(seen.reset <= spend.reset, "{seen:?} after {spend:?}");
            assert!(
                spend.reset - seen.reset < Duration::from_millis(500),
                "{seen:?} after {spend:?}"
            );
        }
        // The same wait, give or take the time between the two checks.
        let (fast_wait, slow_wait) = (
            from_fast.retry_after.unwrap(),
            from_slow.retry_after.unwrap(),
        );
        assert!(slow_wait <= fast_wait, "{from_fast:?} then {from_slow:?}");
        assert!(
            fast_wait - slow_wait < Duration::from_millis(100),
            "{from_fast:?} then {from_slow:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One trace, the same decisions
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Trace {
    limit: u64,
    window_ms: u64,
    start_us: u64,
    /// (nanoseconds since the previous step, key, cost)
    steps: Vec<(u64, usize, u64)>,
    /// (strikes, first block ms, longest block ms, quiet ms), for a penalized replay.
    penalty: (u32, u64, u64, u64),
}

fn traces() -> impl Strategy<Value = Trace> {
    let step = (
        prop_oneof![
            0..=1_000_000u64,     // within a millisecond
            0..=300_000_000u64,   // a fraction of a window
            0..=3_000_000_000u64, // across windows
        ],
        0..3usize,
        prop_oneof![1 => Just(0u64), 8 => 1..=3u64],
    );
    (
        1..=8u64,
        // Windows of at least a second: Redis expires keys on its real clock, and a trace must
        // finish well within the shortest TTL it sets.
        1_000..=10_000u64,
        1_600_000_000_000_000..1_900_000_000_000_000u64,
        prop::collection::vec(step, 60),
        (1..=4u32, 1..=3_000u64, 0..=6_000u64, 1..=20_000u64),
    )
        .prop_map(
            |(limit, window_ms, start_us, steps, (strikes, block, more, quiet))| Trace {
                limit,
                window_ms,
                start_us,
                steps,
                penalty: (strikes, block, block + more, quiet),
            },
        )
}

/// Feeds each random trace to a fresh memory store and to Redis (a fresh key prefix), for every
/// algorithm: every decision must be identical, to the microsecond. (GCRA's documented
/// tolerance is none: both stores run it on the same whole-microsecond integers.)
#[test]
fn memory_and_redis_decide_a_trace_identically() {
    replay_traces(1, &ALGORITHMS, On::Server);
}

/// The same traces against a Redis Cluster of three masters.
#[test]
fn memory_and_a_cluster_decide_a_trace_identically() {
    replay_traces(1, &ALGORITHMS, On::Cluster);
}

/// The same traces under a penalty: strikes, blocks, doubling and forgiveness decided alike.
#[test]
fn memory_and_redis_decide_a_penalized_trace_identically() {
    replay_traces(1, &ALGORITHMS, On::PenalizedServer);
}

/// A penalized trace on a Cluster: the counter and its penalty share a slot.
#[test]
fn memory_and_a_cluster_decide_a_penalized_trace_identically() {
    replay_traces(1, &ALGORITHMS, On::PenalizedCluster);
}

/// Where a trace's Redis decisions are made, and whether under its penalty.
#[derive(Clone, Copy, PartialEq)]
enum On {
    Server,
    Cluster,
    PenalizedServer,
    PenalizedCluster,
}

impl On {
    fn cluster(self) -> bool {
        matches!(self, Self::Cluster | Self::PenalizedCluster)
    }

    fn penalized(self) -> bool {
        matches!(self, Self::PenalizedServer | Self::PenalizedCluster)
    }

    fn penalty(self, trace: &Trace) -> Option<Penalty> {
        if !self.penalized() {
            return None;
        }
        let (strikes, block, max, quiet) = trace.penalty;
        let ms = Duration::from_millis;
        Some(
            Penalty::new(strikes, ms(block))
                .and_then(|p| p.with_max_block(ms(max)))
                .and_then(|p| p.with_quiet(ms(quiet)))
                .expect("valid penalty"),
        )
    }
}

/// The same with limits and costs scaled up to a billion per window, where the sliding window
/// coarsens its ticks (`limit × window` passes 2^51). The log keeps a member per unit, so it
/// sits this one out.
#[test]
fn memory_and_redis_decide_a_trace_of_huge_quotas_identically() {
    replay_traces(
        125_000_000,
        &[Algorithm::SlidingWindow, Algorithm::Gcra],
        On::Server,
    );
}

/// Replays random traces on both stores, limits and costs multiplied by `scale`.
fn replay_traces(scale: u64, algorithms: &[Algorithm], on: On) {
    let (server, cluster, urls) = match on.cluster() {
        false => {
            let Some(server) = RedisServer::start() else {
                return;
            };
            let url = vec![server.url()];
            (Some(server), None, url)
        }
        true => {
            let Some(cluster) = RedisCluster::start_masters_only() else {
                return;
            };
            let urls = cluster.urls();
            (None, Some(cluster), urls)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend = runtime.block_on(async {
        if on.cluster() {
            RedisBackend::cluster(urls.clone()).expect("backend")
        } else {
            RedisBackend::new(&urls[0]).expect("backend")
        }
    });
    let cases = AtomicU64::new(0);
    let blocked = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&traces(), |trace| {
        let case = cases.fetch_add(1, Ordering::Relaxed);
        runtime.block_on(async {
            let limit = trace.limit * scale;
            let quota = Quota::new(limit, Duration::from_millis(trace.window_ms)).unwrap();
            for &algorithm in algorithms {
                let memory = MemoryRateStore::new();
                let redis = RedisRateStore::new(backend.clone())
                    .with_timeout(Duration::from_secs(2))
                    .with_key_prefix(format!("trace{case}:{}:", algorithm.as_str()));
                let mut at = UNIX_EPOCH + Duration::from_micros(trace.start_us);
                for (step, &(gap_ns, key, cost)) in trace.steps.iter().enumerate() {
                    at += Duration::from_nanos(gap_ns);
                    let key = format!("k{key}");
                    let cost = cost * scale;
                    let mut check = Check::new(&key, quota, algorithm, cost).at(at);
                    check.penalty = on.penalty(&trace);
                    let from_memory = memory.check(&check).await.expect("memory");
                    let from_redis = redis
                        .check(&check)
                        .await
                        .map_err(|e| TestCaseError::fail(format!("Redis failed: {e:?}")))?;
                    blocked.fetch_add(u64::from(from_redis.blocked), Ordering::Relaxed);
                    prop_assert_eq!(
                        from_memory,
                        from_redis,
                        "{:?}, step {}: {}, cost {}",
                        algorithm,
                        step,
                        key,
                        cost
                    );
                }
            }
            Ok(())
        })
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let blocked = blocked.into_inner();
    if on.penalized() {
        eprintln!("{blocked} decisions refused by a penalty block");
        assert!(blocked > 0, "the traces never reached a block");
    } else {
        assert_eq!(blocked, 0);
    }
    if let Some(cluster) = &cluster {
        let spread = cluster.keys_per_master();
        assert!(
            spread.iter().all(|&keys| keys > 0),
            "keys per master: {spread:?}"
        );
    }
    drop(server);
}

/// Quotas so large that `limit × window` would pass 2^53: the sliding window coarsens its
/// ticks, and both stores still agree.
#[tokio::test]
async fn huge_quotas_decide_the_same_on_both_stores() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let redis = redis_store(&server);
    let memory = MemoryRateStore::new();
    let year = Duration::from_secs(365 * 24 * 3600);
    let quota = Quota::new(1_000_000_000, year).unwrap();
    let start = epoch_second(1_750_000_000);
    let times = [0, 1, 1_000_003, 86_400_000_000_123, 400 * 86_400_000_000];
    for algorithm in [Algorithm::SlidingWindow, Algorithm::Gcra] {
        for (n, offset) in times.into_iter().enumerate() {
            for cost in [0, 1, 999_999_999, 1_000_000_000, 1_000_000_001] {
                let check = Check::new(algorithm.as_str(), quota, algorithm, cost)
                    .at(start + Duration::from_micros(offset));
                assert_eq!(
                    decide(&memory, &check).await,
                    decide(&redis, &check).await,
                    "{algorithm:?}, time {n}, cost {cost}"
                );
            }
        }
    }
    // The log keeps one member per unit: a large limit with small costs.
    let quota = Quota::new(100_000, year).unwrap();
    for (n, offset) in times.into_iter().enumerate() {
        for cost in [0, 1, 1_500, 99_999, 100_001] {
            let check = Check::new("huge-log", quota, Algorithm::SlidingLog, cost)
                .at(start + Duration::from_micros(offset));
            assert_eq!(
                decide(&memory, &check).await,
                decide(&redis, &check).await,
                "time {n}, cost {cost}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Retry-after and the edge cases, on both stores
// ---------------------------------------------------------------------------------------------

/// The waits every store must give, at explicit times so that they are exact.
async fn retry_after_conformance(store: &dyn RateLimitStore, name: &str) {
    let quota = Quota::per_second(10);
    // Half-way through a one-second window.
    let t0 = epoch_second(1_750_000_000) + 500 * MS;
    for algorithm in ALGORITHMS {
        let key = |case: &str| format!("{name}:{}:{case}", algorithm.as_str());

        // Sub-second waits: exhaust 10/s, then one more.
        let exhaust = key("sub-second");
        let denied_at = match algorithm {
            Algorithm::SlidingLog => {
                for n in 0..10 {
                    let at = t0 + n * 100 * MS;
                    assert!(
                        decide(store, Check::new(&exhaust, quota, algorithm, 1).at(at))
                            .await
                            .allowed
                    );
                }
                t0 + 950 * MS
            }
            _ => {
                let spent = decide(store, Check::new(&exhaust, quota, algorithm, 10).at(t0)).await;
                assert!(
                    spent.allowed && spent.remaining == 0,
                    "{algorithm:?}: {spent:?}"
                );
                t0
            }
        };
        let one_more = Check::new(&exhaust, quota, algorithm, 1);
        let denied = decide(store, one_more.clone().at(denied_at)).await;
        let expected = match algorithm {
            // Next window: 10 * (1 - e) + 1 <= 10 once e >= 0.1, i.e. 0.6 s from mid-window.
            Algorithm::SlidingWindow => 600 * MS,
            // The first unit (at t0) leaves at t0 + 1 s.
            Algorithm::SlidingLog => 50 * MS,
            // One emission interval.
            _ => 100 * MS,
        };
        assert!(!denied.allowed);
        assert_eq!(
            denied.retry_after,
            Some(expected),
            "{name} {algorithm:?}: {denied:?}"
        );
        assert!(expected > Duration::ZERO && expected < SECOND);
        // The wait is exact: a microsecond earlier is still too early, then it fits.
        let just_before = decide(
            store,
            one_more
                .clone()
                .at(denied_at + expected - Duration::from_micros(1)),
        )
        .await;
        assert!(
            !just_before.allowed,
            "{name} {algorithm:?}: {just_before:?}"
        );
        assert!(
            decide(store, one_more.at(denied_at + expected))
                .await
                .allowed
        );

        // Cost > 1: 8 spent, 3 more wait longer than 1 would; the denial spends nothing.
        let heavy = key("cost-3");
        assert!(
            decide(store, Check::new(&heavy, quota, algorithm, 8).at(t0))
                .await
                .allowed
        );
        let (asked_at, expected) = match algorithm {
            // Next window: 8 * (1 - e) + 3 <= 10 once e >= 0.125, 0.375 s after t0 + 0.25 s.
            Algorithm::SlidingWindow => (t0 + 250 * MS, 375 * MS),
            // The oldest of the 8 (all spent at t0) leaves at t0 + 1 s.
            Algorithm::SlidingLog => (t0 + 250 * MS, 750 * MS),
            // TAT t0 + 0.8 s; 3 intervals fit once it is within 0.7 s of now.
            _ => (t0, 100 * MS),
        };
        let denied = decide(store, Check::new(&heavy, quota, algorithm, 3).at(asked_at)).await;
        assert!(!denied.allowed);
        assert_eq!(
            denied.retry_after,
            Some(expected),
            "{name} {algorithm:?}: {denied:?}"
        );
        let two = decide(store, Check::new(&heavy, quota, algorithm, 2).at(asked_at)).await;
        assert!(
            two.allowed,
            "{name} {algorithm:?}: the denial spent something: {two:?}"
        );

        // Cost above the limit: denied for good, nothing spent.
        let greedy = key("greedy");
        let never = decide(store, Check::new(&greedy, quota, algorithm, 11).at(t0)).await;
        assert_eq!(
            (never.allowed, never.retry_after, never.remaining),
            (false, None, 10),
            "{name} {algorithm:?}"
        );
        assert!(
            decide(store, Check::new(&greedy, quota, algorithm, 10).at(t0))
                .await
                .allowed
        );

        // Limit 0: nothing is ever allowed.
        let blocked = decide(
            store,
            Check::new(key("blocked"), Quota::per_minute(0), algorithm, 1).at(t0),
        )
        .await;
        assert_eq!(
            blocked,
            Decision::denied(0, 0, Duration::ZERO, None),
            "{name} {algorithm:?}"
        );

        // Cost 0 reads without spending.
        let read = key("read");
        assert!(
            decide(store, Check::new(&read, quota, algorithm, 4).at(t0))
                .await
                .allowed
        );
        let peek = decide(store, Check::new(&read, quota, algorithm, 0).at(t0)).await;
        assert_eq!(
            (peek.allowed, peek.remaining),
            (true, 6),
            "{name} {algorithm:?}"
        );
        let again = decide(store, Check::new(&read, quota, algorithm, 0).at(t0)).await;
        assert_eq!(peek, again);
    }
}

#[tokio::test]
async fn memory_store_retry_after_values() {
    retry_after_conformance(&MemoryRateStore::new(), "memory").await;
}

#[tokio::test]
async fn redis_store_retry_after_values() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    retry_after_conformance(&redis_store(&server), "redis").await;
}

/// The same on Redis's own clock: sub-second waits come out as such (never rounded to 0 or
/// up to a second).
#[tokio::test]
async fn sub_second_waits_on_redis_time() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server);
    let quota = Quota::per_second(10);
    for algorithm in ALGORITHMS {
        let key = format!("now:{}", algorithm.as_str());
        let mut denied = None;
        for _ in 0..20 {
            let decision = decide(&store, Check::new(&key, quota, algorithm, 1)).await;
            if !decision.allowed {
                denied = Some(decision);
                break;
            }
        }
        let denied = denied.expect("10/s runs out within 20 quick checks");
        let retry = denied.retry_after.expect("a wait");
        // The sliding window may have to wait out the rest of this window and a tenth of the
        // next (10 spent early in one window weigh 10 × (1 − t) until t ≥ 0.1): up to 1.1 s.
        let longest = if algorithm == Algorithm::SlidingWindow {
            1101 * MS
        } else {
            SECOND
        };
        assert!(
            retry > Duration::ZERO && retry < longest,
            "{algorithm:?}: {denied:?}"
        );
        if algorithm == Algorithm::Gcra {
            assert!(retry <= 100 * MS, "{denied:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis keys and errors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_keys_expire_once_their_counts_no_longer_matter() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server).with_key_prefix("app:");
    let quota = Quota::per_minute(60);
    for (algorithm, longest_ms) in [
        (Algorithm::SlidingWindow, 120_000),
        (Algorithm::SlidingLog, 60_000),
        (Algorithm::Gcra, 1_000),
    ] {
        let key = format!("ttl:{}", algorithm.as_str());
        decide(&store, Check::new(&key, quota, algorithm, 1)).await;
        let ttl: i64 = server
            .cli(&["PTTL", &format!("app:{}", CounterKey::from(&key))])
            .trim()
            .parse()
            .unwrap();
        assert!(ttl > 0 && ttl <= longest_ms, "{algorithm:?}: PTTL {ttl}");
    }
    // The sliding window's deadline is its window's end plus one more window: set once per
    // window, not moved by later checks in the same window.
    let hourly = Quota::per_hour(60);
    let key = "ttl:once-per-window";
    let deadline = || -> i64 {
        server
            .cli(&["PEXPIRETIME", &format!("app:{}", CounterKey::from(key))])
            .trim()
            .parse()
            .unwrap()
    };
    decide(&store, Check::new(key, hourly, Algorithm::SlidingWindow, 1)).await;
    let first = deadline();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    decide(&store, Check::new(key, hourly, Algorithm::SlidingWindow, 1)).await;
    assert_eq!(deadline(), first);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        first > now_ms + 3_600_000 && first <= now_ms + 7_200_000,
        "{first} vs {now_ms}"
    );

    // A denied check writes nothing.
    let check = Check::new("denied", quota, Algorithm::Gcra, 61);
    assert!(!decide(&store, check).await.allowed);
    let denied = format!("app:{}", CounterKey::from("denied"));
    assert_eq!(server.cli(&["EXISTS", &denied]).trim(), "0");
}

#[tokio::test]
async fn redis_errors_split_outages_from_failures() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server).with_key_prefix("");
    server.cli(&["SET", &CounterKey::from("a-string").to_string(), "x"]);
    let error = store
        .check(&Check::new(
            "a-string",
            Quota::per_minute(5),
            Algorithm::SlidingLog,
            1,
        ))
        .await
        .unwrap_err();
    assert!(!error.is_outage(), "{error:?}");

    server.stop();
    let error = store
        .check(&Check::new(
            "k",
            Quota::per_minute(5),
            Algorithm::SlidingWindow,
            1,
        ))
        .await
        .unwrap_err();
    assert!(error.is_outage(), "{error:?}");
}

/// After a restart Redis has forgotten the scripts: EVALSHA's NOSCRIPT reloads them.
#[tokio::test]
async fn scripts_reload_after_a_redis_restart() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server);
    for algorithm in ALGORITHMS {
        let before = format!("before:{}", algorithm.as_str());
        decide(
            &store,
            Check::new(&before, Quota::per_minute(5), algorithm, 1),
        )
        .await;
    }
    // As the store loads it: the shared prelude, how the algorithm answers alone, then the
    // algorithm itself.
    let script = concat!(
        include_str!("../../src/ratelimit/store/lua/prelude.lua"),
        include_str!("../../src/ratelimit/store/lua/answer.lua"),
        include_str!("../../src/ratelimit/store/lua/sliding_window.lua")
    );
    let sha = server.cli(&["SCRIPT", "LOAD", script]).trim().to_owned();
    server.restart();
    assert_eq!(server.cli(&["SCRIPT", "EXISTS", &sha]).trim(), "0");
    for algorithm in ALGORITHMS {
        let after = format!("after:{}", algorithm.as_str());
        let check = Check::new(&after, Quota::per_minute(5), algorithm, 1);
        // The connection comes back by itself; the first call may still see the old socket.
        let mut decision = store.check(&check).await;
        for _ in 0..20 {
            if decision.is_ok() {
                break;
            }
            tokio::time::sleep(50 * MS).await;
            decision = store.check(&check).await;
        }
        let decision = decision.expect("the store answers again");
        assert!(
            decision.allowed && decision.remaining == 4,
            "{algorithm:?}: {decision:?}"
        );
    }
    assert_eq!(server.cli(&["SCRIPT", "EXISTS", &sha]).trim(), "1");
}

// ---------------------------------------------------------------------------------------------
// A bounded memory store
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_flood_of_distinct_keys_stays_within_max_keys() {
    let store = MemoryRateStore::builder().max_keys(1_000).build();
    let quota = Quota::per_hour(100);
    for n in 0..50_000 {
        let key = format!("flood:{n}");
        let decision = decide(&store, Check::new(&key, quota, Algorithm::SlidingWindow, 1)).await;
        assert!(decision.allowed);
    }
    let len = store.len();
    assert!(len <= 1_000, "{len} keys held");
    assert!(len > 0);
}

#[tokio::test]
async fn idle_keys_are_swept_by_themselves() {
    let store = MemoryRateStore::new();
    let quota = Quota::new(5, 10 * MS).unwrap();
    for algorithm in ALGORITHMS {
        for n in 0..100 {
            let key = format!("idle:{}:{n}", algorithm.as_str());
            decide(&store, Check::new(&key, quota, algorithm, 1)).await;
        }
    }
    assert_eq!(store.len(), 300);
    // Two windows (20 ms) after their last use the keys expire; the store sweeps
    // them at its own (about one-second) resolution.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} keys left",
            store.len()
        );
        tokio::time::sleep(100 * MS).await;
    }
}

#[tokio::test]
async fn a_key_keeps_to_one_algorithm() {
    let store = MemoryRateStore::new();
    let quota = Quota::per_minute(5);
    decide(&store, Check::new("k", quota, Algorithm::Gcra, 1)).await;
    let error = store
        .check(&Check::new("k", quota, Algorithm::SlidingWindow, 1))
        .await
        .unwrap_err();
    assert!(!error.is_outage(), "{error:?}");
}

/// The memory store decides without waiting (the layer's fast path); Redis is the shared one.
#[tokio::test]
async fn only_the_memory_store_decides_at_once_and_only_redis_is_shared() {
    let memory = MemoryRateStore::new();
    let check = Check::new("now", Quota::per_minute(2), Algorithm::SlidingWindow, 1);
    let at_once = memory
        .check(&check)
        .now()
        .expect("decided at once")
        .unwrap();
    assert!(at_once.allowed && at_once.remaining == 1);
    assert_eq!(decide(&memory, &check).await.remaining, 0);
    assert!(!memory.is_shared());

    let Some(server) = RedisServer::start() else {
        return;
    };
    let redis = redis_store(&server);
    assert!(
        redis.check(&check).now().is_err(),
        "Redis answers after a round trip"
    );
    assert!(redis.is_shared());
}

/// A counter key holding what the scripts never write (garbage counts, a window or a TAT far
/// ahead of Redis's clock, log entries in the future), and no TTL: the next decision on
/// Redis's clock treats it as nothing counted, rewrites it with a deadline, and never fails.
#[tokio::test]
async fn corrupted_counter_keys_heal_by_themselves() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server).with_key_prefix("app:");
    let quota = Quota::per_minute(10);
    let now_us = redis_time(&server);
    let window_us = 60_000_000;
    let far = (now_us + 1_000_000_000_000).to_string();
    let index = now_us / window_us;
    let key_of = |name: &str| format!("app:{}", CounterKey::from(name));
    let cases: Vec<(&str, Algorithm, Vec<Vec<String>>)> = vec![
        (
            "window-ahead",
            Algorithm::SlidingWindow,
            vec![vec![
                "HSET".into(),
                key_of("window-ahead"),
                "w".into(),
                (index + 1000).to_string(),
                "c".into(),
                "10".into(),
                "p".into(),
                "10".into(),
            ]],
        ),
        (
            "garbage-counts",
            Algorithm::SlidingWindow,
            vec![vec![
                "HSET".into(),
                key_of("garbage-counts"),
                "w".into(),
                index.to_string(),
                "c".into(),
                "lots".into(),
                "p".into(),
                "-3".into(),
            ]],
        ),
        (
            "tat-ahead",
            Algorithm::Gcra,
            vec![vec!["SET".into(), key_of("tat-ahead"), far.clone()]],
        ),
        (
            "log-ahead",
            Algorithm::SlidingLog,
            (0..10)
                .map(|n| {
                    vec![
                        "ZADD".into(),
                        key_of("log-ahead"),
                        far.clone(),
                        format!("{far}:{n}"),
                    ]
                })
                .collect(),
        ),
    ];
    for (name, algorithm, commands) in cases {
        for command in &commands {
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            server.cli(&args);
        }
        assert_eq!(
            server.cli(&["PTTL", &key_of(name)]).trim(),
            "-1",
            "{name}: no TTL yet"
        );
        let decision = store
            .check(&Check::new(name, quota, algorithm, 1))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(decision.allowed, "{name}: {decision:?}");
        assert_eq!(decision.remaining, 9, "{name}: nothing else counted");
        let ttl: i64 = server.cli(&["PTTL", &key_of(name)]).trim().parse().unwrap();
        assert!(ttl > 0, "{name}: rewritten with a deadline, PTTL {ttl}");
    }
}
