//! Rate-limit benchmarks, each with its anchor measured in the same run.
//!
//! - `ratelimit/memory`: one allowed request through an axum router with the layer and the
//!   in-memory store, next to tower_governor 0.8 on the same router (and the bare router).
//! - `ratelimit/redis`: decisions per second with 32 concurrent tasks on one multiplexed
//!   connection, next to the ceiling of the same Redis: the raw `redis` crate calling the same
//!   script with `EVALSHA` on the same kind of connection.
//! - the over-limit flood: Redis commands per denied request (printed).
//!
//! Run with `cargo bench --manifest-path benches/load/Cargo.toml --bench ratelimit`; the last
//! lines print the ratios. The Redis part starts its own `redis-server` on a loopback port and
//! is skipped when none is installed.

#[path = "../../../tests/support/mod.rs"]
mod support;

#[path = "../../common/mod.rs"]
mod common;

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
use common::estimate;
use criterion::Criterion;
use http::{Request, StatusCode};
use tokio::runtime::Runtime;
use tower::ServiceExt;
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{Algorithm, Check, Policy, Quota, RateLimitLayer, RateLimitStore, RedisRateStore},
};

fn routes() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

fn ours(headers: bool) -> Router {
    // A quota no benchmark reaches: every request takes the allowed path.
    let policy = Policy::new(
        "bench",
        Quota::new(1_000_000_000, Duration::from_secs(1)).unwrap(),
    )
    .unwrap();
    routes().layer(RateLimitLayer::new(policy).with_headers(headers))
}

fn governor() -> Router {
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_millisecond(1)
        .burst_size(u32::MAX)
        .finish()
        .unwrap();
    routes().layer(tower_governor::GovernorLayer::new(Arc::new(config)))
}

/// tower_governor with its own rate-limit headers, to compare like with like.
fn governor_with_headers() -> Router {
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_millisecond(1)
        .burst_size(u32::MAX)
        .use_headers()
        .finish()
        .unwrap();
    routes().layer(tower_governor::GovernorLayer::new(Arc::new(config)))
}

fn request() -> Request<Body> {
    let mut request = Request::get("/").body(Body::empty()).unwrap();
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([198, 51, 100, 1], 40000))));
    request
}

async fn call(app: &Router) -> StatusCode {
    app.clone().oneshot(request()).await.unwrap().status()
}

fn bench_memory(c: &mut Criterion, runtime: &Runtime) {
    let contenders = [
        ("tower-turnstile", ours(true)),
        ("tower-turnstile-no-headers", ours(false)),
        ("tower_governor", governor()),
        ("tower_governor-headers", governor_with_headers()),
        ("bare", routes()),
    ];
    let mut group = c.benchmark_group("ratelimit/memory");
    for (name, app) in &contenders {
        assert_eq!(runtime.block_on(call(app)), StatusCode::OK, "{name}");
        group.bench_function(*name, |b| {
            b.to_async(runtime)
                .iter(|| async { black_box(call(app).await) })
        });
    }
    group.finish();
}

const TASKS: u64 = 32;

/// Runs `iterations` decisions spread over 32 concurrent tasks; returns the elapsed time.
async fn concurrent<F, Fut>(iterations: u64, decide: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_task = iterations.div_ceil(TASKS);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let decide = decide.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    decide(task * per_task + i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// Decisions on `store` from 32 concurrent tasks, over `keys` keys.
fn bench_store(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    runtime: &Runtime,
    store: &Arc<RedisRateStore>,
    quota: Quota,
    keys: u64,
) {
    group.bench_function(name, |b| {
        b.to_async(runtime).iter_custom(|iterations| {
            let store = Arc::clone(store);
            concurrent(iterations, move |i| {
                let store = Arc::clone(&store);
                async move {
                    let key = format!("bench:{}", i % keys);
                    let decision = store
                        .check(&Check::new(&key, quota, Algorithm::SlidingWindow, 1))
                        .await
                        .unwrap();
                    black_box(decision);
                }
            })
        });
    });
}

fn bench_redis(c: &mut Criterion, runtime: &Runtime) -> Option<support::RedisServer> {
    let server = support::RedisServer::start()?;
    let url = server.url();
    let quota = Quota::new(1_000_000_000, Duration::from_secs(60)).unwrap();
    let store = runtime.block_on(async {
        let store = Arc::new(
            RedisRateStore::new(RedisBackend::new(&url).unwrap())
                .with_timeout(Duration::from_secs(1)),
        );
        store
            .check(&Check::new("warm", quota, Algorithm::SlidingWindow, 1))
            .await
            .unwrap();
        store
    });
    // The ceiling: the same script, called with the raw client on one multiplexed connection.
    let (raw, script) = runtime.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let connection = client.get_multiplexed_async_connection().await.unwrap();
        let script = Arc::new(redis::Script::new(SLIDING_WINDOW));
        (connection, script)
    });

    let mut group = c.benchmark_group("ratelimit/redis");
    group.sample_size(20);
    let keys = 1024;
    bench_store(&mut group, "tower-turnstile", runtime, &store, quota, keys);
    group.bench_function("raw-evalsha", |b| {
        b.to_async(runtime).iter_custom(|iterations| {
            let (raw, script) = (raw.clone(), Arc::clone(&script));
            concurrent(iterations, move |i| {
                let (mut raw, script) = (raw.clone(), Arc::clone(&script));
                async move {
                    let key = format!("turnstile:raw:{}", i % keys);
                    let reply: redis::Value = raw_invocation(&script, &key, quota)
                        .invoke_async(&mut raw)
                        .await
                        .unwrap();
                    black_box(reply);
                }
            })
        });
    });
    // The same decisions on a Redis Cluster of three masters (the keys spread over all three).
    let cluster = support::RedisCluster::start_masters_only();
    if let Some(cluster) = &cluster {
        let store = runtime.block_on(async {
            let backend = RedisBackend::cluster(cluster.urls()).unwrap();
            let store = Arc::new(RedisRateStore::new(backend).with_timeout(Duration::from_secs(1)));
            store
                .check(&Check::new("warm", quota, Algorithm::SlidingWindow, 1))
                .await
                .unwrap();
            store
        });
        bench_store(
            &mut group,
            "tower-turnstile-cluster",
            runtime,
            &store,
            quota,
            keys,
        );
    }
    group.finish();
    drop(cluster);
    Some(server)
}

/// The store's own sliding-window script, so the ceiling runs exactly the same Lua.
const SLIDING_WINDOW: &str = concat!(
    include_str!("../../../src/ratelimit/store/lua/prelude.lua"),
    include_str!("../../../src/ratelimit/store/lua/answer.lua"),
    include_str!("../../../src/ratelimit/store/lua/sliding_window.lua")
);

/// `EVALSHA` of the script with the store's argument layout: time ('' = Redis `TIME`), window
/// in microseconds, limit, cost.
fn raw_invocation<'a>(
    script: &'a redis::Script,
    key: &str,
    quota: Quota,
) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.key(key);
    invocation
        .arg("")
        .arg(quota.window().as_micros() as u64)
        .arg(quota.limit())
        .arg(1);
    invocation
}

fn main() {
    common::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut criterion = Criterion::default().configure_from_args();
    bench_memory(&mut criterion, &runtime);
    let server = bench_redis(&mut criterion, &runtime);
    criterion.final_summary();
    drop(server);

    let memory = |name| estimate("ratelimit/memory", name);
    if let (Some(ours), Some(plain), Some(theirs), Some(theirs_headers), Some(bare)) = (
        memory("tower-turnstile"),
        memory("tower-turnstile-no-headers"),
        memory("tower_governor"),
        memory("tower_governor-headers"),
        memory("bare"),
    ) {
        println!(
            "ratio memory: tower-turnstile / tower_governor = {:.2} both without headers, {:.2} both with headers \
             (ours {plain:.0} / {ours:.0} ns, theirs {theirs:.0} / {theirs_headers:.0} ns; bare router {bare:.0} ns)",
            plain / theirs,
            ours / theirs_headers,
        );
    }
    if let (Some(ours), Some(raw)) = (
        estimate("ratelimit/redis", "tower-turnstile"),
        estimate("ratelimit/redis", "raw-evalsha"),
    ) {
        println!(
            "ratio redis: tower-turnstile throughput / raw EVALSHA ceiling = {:.2}  ({:.0} vs {:.0} decisions/s, 32 tasks, one connection)",
            raw / ours,
            1e9 / ours,
            1e9 / raw
        );
        if let Some(cluster) = estimate("ratelimit/redis", "tower-turnstile-cluster") {
            println!(
                "ratio redis: cluster of 3 masters / single server = {:.2}  ({:.0} vs {:.0} decisions/s, 32 tasks, one round trip each)",
                ours / cluster,
                1e9 / cluster,
                1e9 / ours
            );
        }
    }
}
