//! The penalty box: escalation, forgiveness and tenants on both stores; a block learned by a
//! second instance and refused from memory; the answers a blocked client gets; the fallback
//! while Redis is down.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
use http::{HeaderValue, Request, StatusCode, header};
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{
        Algorithm, Check, CounterKey, Decision, Fallback, MemoryRateStore, Penalty, Policy, Quota,
        RateLimitLayer, RateLimitStore, RedisRateStore,
    },
    tenant::Tenant,
};

use crate::support::{
    RedisServer,
    http::{Reply, send},
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Two refusals within a window block for 1 s, doubling up to 3 s; forgiven after 10 s quiet.
fn penalty() -> Penalty {
    Penalty::new(2, ms(1000))
        .and_then(|p| p.with_max_block(ms(3000)))
        .and_then(|p| p.with_quiet(ms(10_000)))
        .unwrap()
}

/// One check of `tenant`'s client at `at` ms after a fixed start, 1 per 100 ms, under
/// [`penalty`].
async fn check(store: &dyn RateLimitStore, tenant: &str, at: u64) -> Decision {
    let start: SystemTime = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let key = CounterKey::new(
        Tenant::new(tenant).unwrap(),
        "login:sliding-window",
        IpAddr::from([203, 0, 113, 7]),
    );
    let quota = Quota::new(1, ms(100)).unwrap();
    let check = Check::new(key, quota, Algorithm::SlidingWindow, 1)
        .at(start + ms(at))
        .with_penalty(penalty());
    store.check(&check).await.expect("the store answers")
}

/// Checks `at` ms: one allowed, then refusals until the second one blocks; the block's length.
async fn offend_until_blocked(store: &dyn RateLimitStore, tenant: &str, at: u64) -> Duration {
    assert!(check(store, tenant, at).await.allowed, "allowed at {at} ms");
    let strike = check(store, tenant, at + 10).await;
    assert!(!strike.allowed && !strike.blocked, "a strike at {at} ms");
    let blocked = check(store, tenant, at + 20).await;
    assert!(!blocked.allowed && blocked.blocked, "blocked at {at} ms");
    assert_eq!(blocked.remaining, 0);
    blocked.retry_after.expect("a block says how long")
}

async fn escalation_and_forgiveness(store: &dyn RateLimitStore) {
    // First block: 1 s, from 20 ms to 1020 ms.
    assert_eq!(offend_until_blocked(store, "acme", 0).await, ms(1000));
    let during = check(store, "acme", 500).await;
    assert!(during.blocked);
    assert_eq!(during.retry_after, Some(ms(520)));
    assert_eq!(during.reset, ms(520));
    // The same client in another tenant is not blocked.
    assert!(check(store, "globex", 500).await.allowed);
    // Offending again: 2 s, then the 3 s cap.
    assert_eq!(offend_until_blocked(store, "acme", 1020).await, ms(2000));
    assert_eq!(offend_until_blocked(store, "acme", 3040).await, ms(3000));
    // The last block ended at 6060 ms: 10 s of quiet later, the next block is 1 s again.
    assert_eq!(offend_until_blocked(store, "acme", 16_100).await, ms(1000));
}

#[tokio::test]
async fn memory_blocks_escalate_and_are_forgiven_after_a_quiet_period() {
    escalation_and_forgiveness(&MemoryRateStore::new()).await;
}

#[tokio::test]
async fn redis_blocks_escalate_and_are_forgiven_after_a_quiet_period() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RedisRateStore::new(RedisBackend::new(&server.url()).unwrap())
        .with_timeout(Duration::from_secs(2));
    escalation_and_forgiveness(&store).await;
    // The counter and its offences live in one hash slot, under the tenant.
    let keys = server.cli(&["--raw", "KEYS", "*"]);
    assert!(
        keys.contains("turnstile:{acme:rl:login:sliding-window:203.0.113.7}:penalty"),
        "{keys}"
    );
}

// ---------------------------------------------------------------------------------------------
// The layer.

fn app(layer: RateLimitLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer)
}

fn request_from(ip: &str) -> Request<Body> {
    let mut request = Request::get("/").body(Body::empty()).unwrap();
    let addr: SocketAddr = format!("{ip}:40000").parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(addr));
    request
}

async fn hit(app: &Router, ip: &str) -> Reply {
    send(app, request_from(ip)).await
}

fn retry_after(reply: &Reply) -> u64 {
    reply.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// 1 per 100 ms per client IP; two refusals within a window block for 5 s.
fn layer() -> RateLimitLayer {
    let policy = Policy::new("login", Quota::new(1, ms(100)).unwrap())
        .unwrap()
        .with_penalty(Penalty::new(2, Duration::from_secs(5)).unwrap());
    RateLimitLayer::new(policy)
}

/// One request allowed, one refused, one blocked: the blocked one's reply.
async fn get_blocked(app: &Router, ip: &str) -> Reply {
    assert_eq!(hit(app, ip).await.status, StatusCode::OK);
    let strike = hit(app, ip).await;
    assert_eq!(strike.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&strike) <= 1, "a strike waits for the window");
    let blocked = hit(app, ip).await;
    assert_eq!(blocked.status, StatusCode::TOO_MANY_REQUESTS);
    blocked
}

#[tokio::test]
async fn a_blocked_client_gets_429_with_the_block_in_retry_after_and_grpc_its_status() {
    let app = app(layer());
    let blocked = get_blocked(&app, "198.51.100.1").await;
    assert_eq!(retry_after(&blocked), 5);
    let state = blocked.headers["ratelimit"].to_str().unwrap();
    assert!(state.starts_with("\"login\";r=0;t=5"), "{state}");
    // Still blocked after the window has passed.
    tokio::time::sleep(ms(250)).await;
    let later = hit(&app, "198.51.100.1").await;
    assert_eq!(later.status, StatusCode::TOO_MANY_REQUESTS);
    assert!((4..=5).contains(&retry_after(&later)));
    // gRPC: RESOURCE_EXHAUSTED, with the same wait.
    let mut grpc = request_from("198.51.100.1");
    grpc.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let reply = send(&app, grpc).await;
    assert_eq!(reply.headers["grpc-status"], "8");
    assert!((4..=5).contains(&retry_after(&reply)));
    // Another client is not affected.
    assert_eq!(hit(&app, "198.51.100.2").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_learns_of_a_block_and_refuses_it_without_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let instance = || app(layer().with_redis(RedisBackend::new(&server.url()).unwrap()));
    let (a, b) = (instance(), instance());
    // B serves someone else first: its layer now follows the blocks feed.
    assert_eq!(hit(&b, "198.51.100.9").await.status, StatusCode::OK);

    let blocked = get_blocked(&a, "198.51.100.1").await;
    assert_eq!(retry_after(&blocked), 5);
    tokio::time::sleep(Penalty::BROADCAST_DELAY * 3).await;

    let monitor = server.monitor();
    for _ in 0..20 {
        let reply = hit(&b, "198.51.100.1").await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert!((4..=5).contains(&retry_after(&reply)));
    }
    let commands = monitor.take();
    let about_the_key: Vec<_> = commands
        .iter()
        .filter(|c| c.contains("198.51.100.1"))
        .collect();
    assert!(
        about_the_key.is_empty(),
        "B asked Redis about the blocked key: {about_the_key:?}"
    );
    // B never counted the key: had it asked Redis, Redis would say the same.
    assert_eq!(hit(&b, "198.51.100.2").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_the_fallback_blocks_by_the_same_rules() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let app = app(layer()
        .with_store(RedisRateStore::new(backend).with_timeout(ms(50)))
        .with_fallback(Fallback::Local { share: 1.0 }));
    server.stop();
    let blocked = get_blocked(&app, "198.51.100.1").await;
    assert_eq!(retry_after(&blocked), 5);
    tokio::time::sleep(ms(250)).await;
    assert_eq!(
        hit(&app, "198.51.100.1").await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "still blocked past the window"
    );
    assert_eq!(hit(&app, "198.51.100.2").await.status, StatusCode::OK);
}
