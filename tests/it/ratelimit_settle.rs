//! Costs settled after the response: exact under concurrent requests on both stores, the same
//! decisions from memory and Redis for one trace of reservations and settlements, and the
//! layer's `RateLimit` fields showing the settled count, also while Redis is down.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router, body::Body, extract::ConnectInfo, http::HeaderMap, response::IntoResponse, routing::get,
};
use http::{Request, StatusCode};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{
        Algorithm, Check, Decision, Fallback, MemoryRateStore, Policy, Quota, RateLimitLayer,
        RateLimitStore, RedisRateStore, Settlement,
    },
};

use crate::support::{
    RedisServer,
    http::{Reply, send},
};

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::SlidingWindow,
    Algorithm::SlidingLog,
    Algorithm::Gcra,
];

fn redis_store(server: &RedisServer, prefix: &str) -> RedisRateStore {
    RedisRateStore::new(RedisBackend::new(&server.url()).unwrap())
        .with_timeout(Duration::from_secs(2))
        .with_key_prefix(prefix)
}

/// A time on a window boundary of a minute-long window.
fn at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

// ---------------------------------------------------------------------------------------------
// Exact under concurrency.

/// 40 requests over two store handles, all at one time, each reserve 100 of 10 000 and settle
/// to its own actual cost (0 to 250, refunds and top-ups): what is left afterwards is exactly
/// the limit less the actual costs, for every algorithm.
async fn settlements_are_exact_under_concurrency(stores: [Arc<dyn RateLimitStore>; 2]) {
    for algorithm in ALGORITHMS {
        let key = format!("team-{}", algorithm.as_str());
        let quota = Quota::per_minute(10_000);
        let actuals: Vec<u64> = (0..40u64).map(|i| (i * 37) % 251).collect();
        let mut tasks = Vec::new();
        for (i, &actual) in actuals.iter().enumerate() {
            let store = Arc::clone(&stores[i % 2]);
            let check = Check::new(&key, quota, algorithm, 100).at(at());
            tasks.push(tokio::spawn(async move {
                let reserved = store.check(&check).await.expect("reserved");
                assert!(reserved.allowed);
                tokio::task::yield_now().await;
                let settlement = Settlement::of(check, &reserved, actual).expect("allowed");
                store.settle(&settlement).await.expect("settled")
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let left = stores[0]
            .check(&Check::new(&key, quota, algorithm, 0).at(at()))
            .await
            .unwrap();
        let spent: u64 = actuals.iter().sum();
        assert_eq!(left.remaining, 10_000 - spent, "{algorithm:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_settlements_are_exact_under_concurrency() {
    let store = MemoryRateStore::new();
    settlements_are_exact_under_concurrency([Arc::new(store.clone()), Arc::new(store)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_settlements_are_exact_under_concurrency() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    settlements_are_exact_under_concurrency([
        Arc::new(redis_store(&server, "a:")),
        Arc::new(redis_store(&server, "a:")),
    ])
    .await;
}

#[tokio::test]
async fn a_top_up_spends_what_is_left_and_a_refund_gives_back_where_it_was_counted() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let stores: [Box<dyn RateLimitStore>; 2] = [
        Box::new(MemoryRateStore::new()),
        Box::new(redis_store(&server, "b:")),
    ];
    for store in &stores {
        let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
        let check = |cost, ms| {
            Check::new("k", quota, Algorithm::SlidingWindow, cost)
                .at(at() + Duration::from_millis(ms))
        };
        let reserved = store.check(&check(4, 0)).await.unwrap();
        // A top-up past the limit spends what is left, no more: the key is at its limit.
        let settlement = Settlement::of(check(4, 0), &reserved, 30).unwrap();
        let settled = store.settle(&settlement).await.unwrap();
        assert_eq!((settled.allowed, settled.remaining), (true, 0));
        // A refund after the window has moved on goes back to the window it was counted in,
        // which now weighs as the previous one: without it, half of that window's 10 would
        // still weigh 1.5 s in (5 left); with all 10 given back, nothing does.
        let reserved = store.check(&check(0, 0)).await.unwrap();
        let mut refund = Settlement::of(check(10, 0), &reserved, 0).unwrap();
        refund.at = Some(at() + Duration::from_millis(1500));
        let settled = store.settle(&refund).await.unwrap();
        assert_eq!(settled.remaining, 10, "{store:?}");
        // A settlement of a refusal is none.
        let refused = Decision::denied(10, 0, Duration::ZERO, Some(Duration::from_secs(1)));
        assert!(Settlement::of(check(1, 0), &refused, 0).is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// One trace, the same decisions.

/// (ms since the previous step, key, cost, actual cost, steps until settled): each allowed
/// check is settled to its actual cost that many steps later, before that step's check, so
/// other checks of the key may move its window on in between.
type Step = (u64, usize, u64, u64, usize);

fn traces() -> impl Strategy<Value = (u64, u64, Vec<Step>)> {
    let step = (0..=700u64, 0..2usize, 0..=4u64, 0..=8u64, 1..=4usize);
    (1..=10u64, 1_000..=3_000u64, prop::collection::vec(step, 50))
}

#[test]
fn memory_and_redis_settle_a_trace_identically() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend = runtime.block_on(async { RedisBackend::new(&server.url()).unwrap() });
    let cases = std::sync::atomic::AtomicU64::new(0);
    let corrected = std::sync::atomic::AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&traces(), |(limit, window_ms, steps)| {
        let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(async {
            let quota = Quota::new(limit, Duration::from_millis(window_ms)).unwrap();
            for algorithm in ALGORITHMS {
                let memory = MemoryRateStore::new();
                let redis = RedisRateStore::new(backend.clone())
                    .with_timeout(Duration::from_secs(2))
                    .with_key_prefix(format!("settle{case}:{}:", algorithm.as_str()));
                let mut now = at();
                let mut pending: Vec<(usize, Check, Decision, u64)> = Vec::new();
                for (step, &(gap, key, cost, actual, after)) in steps.iter().enumerate() {
                    now += Duration::from_millis(gap);
                    let (due, later) = pending.into_iter().partition(|(at, ..)| *at <= step);
                    pending = later;
                    let due: Vec<_> = due;
                    for (_, check, decision, actual) in due {
                        if actual != check.cost {
                            corrected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        let mut settlement = Settlement::of(check, &decision, actual).unwrap();
                        settlement.at = Some(now);
                        let from_memory = memory.settle(&settlement).await.expect("memory");
                        let from_redis = redis
                            .settle(&settlement)
                            .await
                            .map_err(|e| TestCaseError::fail(format!("Redis failed: {e:?}")))?;
                        prop_assert_eq!(from_memory, from_redis, "{:?} settle {}", algorithm, step);
                    }
                    let check = Check::new(format!("k{key}"), quota, algorithm, cost).at(now);
                    let from_memory = memory.check(&check).await.expect("memory");
                    let from_redis = redis
                        .check(&check)
                        .await
                        .map_err(|e| TestCaseError::fail(format!("Redis failed: {e:?}")))?;
                    prop_assert_eq!(from_memory, from_redis, "{:?} step {}", algorithm, step);
                    if from_redis.allowed {
                        pending.push((step + after, check, from_redis, actual));
                    }
                }
            }
            Ok(())
        })
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let corrected = corrected.into_inner();
    eprintln!("{corrected} settlements that refunded or topped up");
    assert!(corrected > 0);
}

// ---------------------------------------------------------------------------------------------
// The layer.

/// Each call reports the tokens it used in `x-tokens-used` (from the query, `?used=N`); a
/// `?fail` call answers 500.
fn app(layer: RateLimitLayer) -> Router {
    async fn call(uri: axum::http::Uri) -> impl IntoResponse {
        let query = uri.query().unwrap_or_default();
        if query == "fail" {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                HeaderMap::new(),
                "failed",
            );
        }
        let used = query.strip_prefix("used=").unwrap_or("0").to_owned();
        let mut headers = HeaderMap::new();
        headers.insert("x-tokens-used", used.parse().unwrap());
        (StatusCode::OK, headers, "answer")
    }
    Router::new().route("/", get(call)).layer(layer)
}

async fn call(app: &Router, query: &str) -> Reply {
    let mut request = Request::get(format!("/?{query}"))
        .body(Body::empty())
        .unwrap();
    let addr: std::net::SocketAddr = "198.51.100.1:40000".parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(addr));
    send(app, request).await
}

fn remaining(reply: &Reply) -> u64 {
    let state = reply.headers["ratelimit"].to_str().unwrap();
    let r = state.split(";r=").nth(1).unwrap();
    r.split(';').next().unwrap().parse().unwrap()
}

/// 1 000 tokens a minute; each call reserves 100 and is settled to what it used; a failed
/// call is free.
fn tokens() -> RateLimitLayer {
    let policy = Policy::new("tokens", Quota::per_minute(1_000))
        .unwrap()
        .with_cost(100)
        .with_settlement(|response| {
            if response.status.is_server_error() {
                return 0;
            }
            response.header_u64("x-tokens-used").unwrap_or(100)
        });
    RateLimitLayer::new(policy)
}

async fn responses_show_the_settled_count(app: &Router) {
    assert_eq!(remaining(&call(app, "used=30").await), 970);
    assert_eq!(remaining(&call(app, "used=300").await), 670);
    assert_eq!(
        remaining(&call(app, "fail").await),
        670,
        "a failure is free"
    );
    assert_eq!(remaining(&call(app, "used=100").await), 570);
    // The next request reserves from the settled count.
    assert_eq!(remaining(&call(app, "used=100").await), 470);
}

#[tokio::test]
async fn memory_responses_show_the_settled_count() {
    responses_show_the_settled_count(&app(tokens())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_responses_show_the_settled_count_on_every_instance() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let one = app(tokens().with_redis(RedisBackend::new(&server.url()).unwrap()));
    let two = app(tokens().with_redis(RedisBackend::new(&server.url()).unwrap()));
    responses_show_the_settled_count(&one).await;
    assert_eq!(remaining(&call(&two, "used=70").await), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_the_fallback_settles_locally() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = RedisRateStore::new(RedisBackend::new(&server.url()).unwrap())
        .with_timeout(Duration::from_millis(50));
    let layer = tokens()
        .with_store(store)
        .with_fallback(Fallback::Local { share: 0.5 });
    let app = app(layer.clone());
    server.stop();
    // Half the quota, 500, in the local limiter; settled there.
    assert_eq!(remaining(&call(&app, "used=20").await), 480);
    assert_eq!(remaining(&call(&app, "used=180").await), 300);
    assert!(layer.is_falling_back());
}
