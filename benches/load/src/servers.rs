//! The servers under load: one axum router per stack, the same two routes on each.
//!
//! - `GET /read`: reads the counter `n` from the session (or answers `0` without sessions).
//! - `POST /write`: reads `n` and writes `n + 1` (the harness seeds sessions with it).
//!
//! `ours-session-copy` (our sessions with a local copy) also answers `GET /copy-stats`, outside
//! the session layer: the copy's `hits misses invalidations` so far, which the harness reads
//! before and after a run.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{Lease, Policy, Quota, RateLimitLayer},
    session::{RedisStore, Session, SessionLayer},
    tenant::{HostSubdomain, TenantLayer},
};

/// Every stack the harness knows, by the name used on the command line and in reports.
pub const STACKS: &[&str] = &[
    "plain",
    "ours-session",
    "ours-session-copy",
    "ts-session",
    "ts-session-always-save",
    "ts-session-memory",
    "ours-ratelimit",
    "ours-deny",
    "governor-allow",
    "governor-deny",
    "ours-stack",
    "ours-ratelimit-lease",
    "ours-stack-lease",
    "ours-stack-copy",
    "ours-stack-lease-copy",
    "ts-stack",
];

/// Serves `stack` on `port` until killed.
pub async fn serve(stack: &str, port: u16, redis_url: &str) {
    let router = match stack {
        "plain" => plain(),
        "ours-session" => ours_sessions(redis_url),
        "ours-session-copy" => ours_sessions_with_copy(redis_url),
        "ts-session" => ts_sessions(redis_url, false).await,
        "ts-session-always-save" => ts_sessions(redis_url, true).await,
        "ts-session-memory" => ts_sessions_in_memory(),
        "ours-ratelimit" => plain().layer(ours_rate_limit(redis_url, allow_all())),
        "ours-deny" => plain().layer(ours_rate_limit(redis_url, deny_all())),
        "governor-allow" => with_governor(plain(), false),
        "governor-deny" => with_governor(plain(), true),
        "ours-stack" => ours_sessions(redis_url)
            .layer(ours_rate_limit(redis_url, allow_all()))
            .layer(TenantLayer::new(HostSubdomain::first_label())),
        "ours-ratelimit-lease" => {
            plain().layer(ours_rate_limit(redis_url, allow_all()).with_lease(lease()))
        }
        "ours-stack-lease" => ours_sessions(redis_url)
            .layer(ours_rate_limit(redis_url, allow_all()).with_lease(lease()))
            .layer(TenantLayer::new(HostSubdomain::first_label())),
        "ours-stack-copy" => ours_sessions_with_copy(redis_url)
            .layer(ours_rate_limit(redis_url, allow_all()))
            .layer(TenantLayer::new(HostSubdomain::first_label())),
        "ours-stack-lease-copy" => ours_sessions_with_copy(redis_url)
            .layer(ours_rate_limit(redis_url, allow_all()).with_lease(lease()))
            .layer(TenantLayer::new(HostSubdomain::first_label())),
        "ts-stack" => with_governor(ts_sessions(redis_url, false).await, false),
        other => panic!("unknown stack {other:?}; known: {STACKS:?}"),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the server's port");
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    .expect("serve");
}

fn plain() -> Router {
    Router::new()
        .route("/read", get(|| async { "0" }))
        .route("/write", post(|| async { "1" }))
}

async fn ours_read(session: Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
    n.to_string()
}

async fn ours_write(session: Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
    let _ = session.insert("n", n).await;
    n.to_string()
}

fn backend(redis_url: &str) -> RedisBackend {
    RedisBackend::new(redis_url).expect("a valid Redis URL")
}

/// Our session layer on Redis, the crate's defaults (today without a local copy: every read
/// goes to Redis).
fn ours_sessions(redis_url: &str) -> Router {
    ours_routes().layer(SessionLayer::new(RedisStore::new(backend(redis_url))).with_secure(false))
}

/// Our session layer on Redis with a local copy, and the copy's counters on `/copy-stats`.
fn ours_sessions_with_copy(redis_url: &str) -> Router {
    let store =
        RedisStore::new(backend(redis_url)).with_local_copy(RedisStore::SUGGESTED_COPY_CAPACITY);
    // A clone on the same backend and prefix shares the layer's copy, and so its counters.
    let counted = store.clone();
    ours_routes()
        .layer(SessionLayer::new(store).with_secure(false))
        .route(
            "/copy-stats",
            get(move || async move {
                let stats = counted.local_copy_stats();
                format!("{} {} {}", stats.hits, stats.misses, stats.invalidations)
            }),
        )
}

fn ours_routes() -> Router {
    Router::new()
        .route("/read", get(ours_read))
        .route("/write", post(ours_write))
}

fn allow_all() -> Quota {
    Quota::new(1_000_000_000, Duration::from_secs(1)).expect("a valid quota")
}

fn deny_all() -> Quota {
    Quota::new(1, Duration::from_secs(3600)).expect("a valid quota")
}

/// Batches of 100 units (of a quota of 10^9/s), each spent for at most 1 s.
fn lease() -> Lease {
    Lease::new(100)
}

/// Our rate limit per client IP, counted in Redis (sliding window, the default).
fn ours_rate_limit(redis_url: &str, quota: Quota) -> RateLimitLayer {
    let policy = Policy::new("per-ip", quota).expect("a valid policy name");
    RateLimitLayer::new(policy).with_redis(backend(redis_url))
}

async fn ts_read(session: tower_sessions::Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
    n.to_string()
}

async fn ts_write(session: tower_sessions::Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
    let _ = session.insert("n", n).await;
    n.to_string()
}

/// tower-sessions 0.14 on tower-sessions-redis-store 0.16 (fred, a pool of 6 as its docs show).
/// Its default expiry does not slide; `always_save` saves on every request with an inactivity
/// expiry, which is how tower-sessions slides one.
async fn ts_sessions(redis_url: &str, always_save: bool) -> Router {
    use tower_sessions_redis_store::{
        RedisStore,
        fred::prelude::{ClientLike, Config, Pool},
    };
    let config = Config::from_url(redis_url).expect("a valid Redis URL");
    let pool = Pool::new(config, None, None, None, 6).expect("a Redis pool");
    let _connection = pool.connect();
    pool.wait_for_connect().await.expect("connect to Redis");
    let mut layer = tower_sessions::SessionManagerLayer::new(RedisStore::new(pool))
        .with_secure(false)
        .with_always_save(always_save);
    if always_save {
        layer = layer.with_expiry(tower_sessions::Expiry::OnInactivity(
            time::Duration::minutes(30),
        ));
    }
    ts_routes().layer(layer)
}

/// tower-sessions 0.14 on its `MemoryStore` (a map behind a mutex, in the process): no round
/// trip at all, so a floor for the server's CPU per request.
fn ts_sessions_in_memory() -> Router {
    let layer = tower_sessions::SessionManagerLayer::new(tower_sessions::MemoryStore::default())
        .with_secure(false);
    ts_routes().layer(layer)
}

fn ts_routes() -> Router {
    Router::new()
        .route("/read", get(ts_read))
        .route("/write", post(ts_write))
}

/// tower_governor 0.8 per peer IP, in memory, around `router`: a quota no run reaches, or one
/// request per hour.
fn with_governor(router: Router, deny: bool) -> Router {
    let mut builder = tower_governor::governor::GovernorConfigBuilder::default();
    if deny {
        builder.period(Duration::from_secs(3600)).burst_size(1);
    } else {
        builder.per_millisecond(1).burst_size(u32::MAX);
    }
    let config = builder.finish().expect("a valid governor config");
    router.layer(tower_governor::GovernorLayer::new(Arc::new(config)))
}
