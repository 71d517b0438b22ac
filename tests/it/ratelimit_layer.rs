//! The rate-limit layer end to end: an axum router, real stores (memory and Redis), requests
//! from chosen client addresses.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
use http::{HeaderValue, Request, Response, StatusCode, header};
use tower_turnstile::{
    backend::{BreakerConfig, RedisBackend},
    ratelimit::{
        Algorithm, Check, ClientIp, CounterKey, Fallback, HeaderKey, Lease, MemoryRateStore,
        MissingKey, Policy, Quota, RateLimitLayer, RateLimitStore, RateLimited, RedisRateStore,
    },
    tenant::Tenant,
};

use crate::support::{
    RedisServer,
    http::{Reply, send},
};

fn app(layer: RateLimitLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/other", get(|| async { "other" }))
        .layer(layer)
}

fn request_from(ip: &str, path: &str) -> Request<Body> {
    let mut request = Request::get(path).body(Body::empty()).unwrap();
    let addr: SocketAddr = format!("{ip}:40000")
        .parse()
        .unwrap_or_else(|_| format!("[{ip}]:40000").parse().unwrap());
    request.extensions_mut().insert(ConnectInfo(addr));
    request
}

async fn hit(app: &Router, ip: &str) -> Reply {
    send(app, request_from(ip, "/")).await
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|v| v.to_str().unwrap())
}

fn policy(limit: u32, window: Duration) -> Policy {
    Policy::new("test", Quota::new(u64::from(limit), window).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Decisions, headers, answers.

#[tokio::test]
async fn allows_up_to_the_limit_then_429_with_headers() {
    let app = app(RateLimitLayer::new(policy(3, Duration::from_secs(60))));
    for remaining in [2, 1, 0] {
        let reply = hit(&app, "198.51.100.1").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            header(&reply, "ratelimit-policy"),
            Some("\"test\";q=3;w=60")
        );
        let state = header(&reply, "ratelimit").unwrap();
        assert!(
            state.starts_with(&format!("\"test\";r={remaining};t=")),
            "{state}"
        );
        assert!(header(&reply, "retry-after").is_none());
    }
    let reply = hit(&app, "198.51.100.1").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = header(&reply, "retry-after").unwrap().parse().unwrap();
    // The sliding window frees a unit only once the previous window's weight has dropped far
    // enough: up to a window and a third here, never more than two windows.
    assert!((1..=120).contains(&retry), "{retry}");
    assert!(
        header(&reply, "ratelimit")
            .unwrap()
            .starts_with("\"test\";r=0;t=")
    );
    assert_eq!(
        header(&reply, "ratelimit-policy"),
        Some("\"test\";q=3;w=60")
    );
    assert_eq!(reply.body, "rate limit exceeded\n");
    // Another client has its own counter.
    assert_eq!(hit(&app, "198.51.100.2").await.status, StatusCode::OK);
}

#[tokio::test]
async fn sub_second_waits_say_one_second_and_clear_in_time() {
    let app = app(RateLimitLayer::new(policy(2, Duration::from_millis(300))));
    hit(&app, "198.51.100.1").await;
    hit(&app, "198.51.100.1").await;
    let reply = hit(&app, "198.51.100.1").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&reply, "retry-after"),
        Some("1"),
        "a sub-second wait rounds up to 1, never 0"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(hit(&app, "198.51.100.1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn cost_above_one_and_above_the_limit() {
    let expensive = policy(10, Duration::from_secs(60)).with_cost(4);
    let costly = app(RateLimitLayer::new(expensive));
    assert_eq!(hit(&costly, "198.51.100.1").await.status, StatusCode::OK);
    let reply = hit(&costly, "198.51.100.1").await;
    assert!(header(&reply, "ratelimit").unwrap().contains(";r=2;"));
    let reply = hit(&costly, "198.51.100.1").await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "4 + 4 + 4 > 10"
    );

    let impossible = app(RateLimitLayer::new(
        policy(3, Duration::from_secs(60)).with_cost(5),
    ));
    let reply = hit(&impossible, "198.51.100.1").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.body, "request cost exceeds the rate limit\n");
    assert!(
        header(&reply, "retry-after").is_none(),
        "waiting would not help"
    );
}

#[tokio::test]
async fn cloned_services_share_one_count() {
    let layer = RateLimitLayer::new(policy(5, Duration::from_secs(60)));
    // Two routers built from the same layer: axum clones services freely, counts must not split.
    let (a, b) = (app(layer.clone()), app(layer));
    let mut allowed = 0;
    for i in 0..10 {
        let target = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(hit(target, "198.51.100.1").await.status == StatusCode::OK);
    }
    assert_eq!(allowed, 5);
}

#[tokio::test]
async fn stacked_layers_each_report_their_policy() {
    let per_ip = RateLimitLayer::new(Policy::new("per-ip", Quota::per_minute(100)).unwrap());
    let per_route = RateLimitLayer::new(
        Policy::new("per-route", Quota::per_minute(1))
            .unwrap()
            .with_key((ClientIp::peer(), tower_turnstile::ratelimit::RouteKey)),
    );
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/other", get(|| async { "other" }))
        .layer(per_route)
        .layer(per_ip);
    let reply = send(&app, request_from("198.51.100.1", "/")).await;
    let policies: Vec<_> = reply
        .headers
        .get_all("ratelimit-policy")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(policies.len(), 2, "{policies:?}");
    assert_eq!(
        send(&app, request_from("198.51.100.1", "/")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&app, request_from("198.51.100.1", "/other"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted_trailers_only() {
    let app = app(RateLimitLayer::new(policy(1, Duration::from_secs(60))));
    let grpc = || {
        let mut request = request_from("198.51.100.1", "/");
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        request
    };
    assert_eq!(send(&app, grpc()).await.status, StatusCode::OK);
    let reply = send(&app, grpc()).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "gRPC errors travel in grpc-status, over HTTP 200"
    );
    assert_eq!(header(&reply, "grpc-status"), Some("8"));
    assert_eq!(header(&reply, "grpc-message"), Some("rate limit exceeded"));
    assert_eq!(header(&reply, "content-type"), Some("application/grpc"));
    assert!(reply.body.is_empty(), "trailers-only: no message frames");
    assert!(header(&reply, "retry-after").is_some());
}

#[tokio::test]
async fn custom_rejection_and_the_reason_in_extensions() {
    let layer =
        RateLimitLayer::new(policy(1, Duration::from_secs(60))).with_rejection(|rejection| {
            let mut response = Response::new(bytes::Bytes::from(format!(
                "slow down ({})",
                rejection.policy
            )));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
        });
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = Arc::clone(&seen);
    let app = app(layer).layer(axum::middleware::map_response(
        move |response: axum::response::Response| {
            let record = Arc::clone(&record);
            async move {
                *record.lock().unwrap() = response
                    .extensions()
                    .get::<RateLimited>()
                    .map(|r| r.policy.to_string());
                response
            }
        },
    ));
    hit(&app, "198.51.100.1").await;
    let reply = hit(&app, "198.51.100.1").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "slow down (test)")
    );
    assert!(
        header(&reply, "retry-after").is_some(),
        "added when the custom response lacks it"
    );
    assert_eq!(seen.lock().unwrap().as_deref(), Some("test"));
}

#[tokio::test]
async fn headers_can_be_turned_off() {
    let app = app(RateLimitLayer::new(policy(1, Duration::from_secs(60))).with_headers(false));
    let reply = hit(&app, "198.51.100.1").await;
    assert!(header(&reply, "ratelimit").is_none());
    let reply = hit(&app, "198.51.100.1").await;
    assert!(header(&reply, "ratelimit").is_none());
    assert!(
        header(&reply, "retry-after").is_some(),
        "Retry-After stays: it is the 429's answer"
    );
}

#[tokio::test]
async fn missing_keys_follow_the_policy() {
    let by_key = |missing| {
        app(RateLimitLayer::new(
            policy(1, Duration::from_secs(60))
                .with_key(HeaderKey::new(http::HeaderName::from_static("x-api-key")))
                .on_missing_key(missing),
        ))
    };
    let no_key = || Request::get("/").body(Body::empty()).unwrap();
    let shared = by_key(MissingKey::SharedCounter);
    assert_eq!(send(&shared, no_key()).await.status, StatusCode::OK);
    assert_eq!(
        send(&shared, no_key()).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "one shared counter"
    );
    let allow = by_key(MissingKey::Allow);
    for _ in 0..3 {
        assert_eq!(send(&allow, no_key()).await.status, StatusCode::OK);
    }
    let deny = by_key(MissingKey::Deny);
    assert_eq!(
        send(&deny, no_key()).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // With a key, each key counts alone.
    let mut keyed = no_key();
    keyed
        .headers_mut()
        .insert("x-api-key", HeaderValue::from_static("k1"));
    assert_eq!(send(&deny, keyed).await.status, StatusCode::OK);
}

#[tokio::test]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let spoofable = |trusted: Option<&str>| {
        let key = match trusted {
            Some(cidr) => ClientIp::trusting([cidr]).unwrap(),
            None => ClientIp::peer(),
        };
        app(RateLimitLayer::new(
            policy(1, Duration::from_secs(60)).with_key(key),
        ))
    };
    let from = |peer: &str, xff: &str| {
        let mut request = request_from(peer, "/");
        request
            .headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        request
    };
    // No trusted proxy: a client rotating X-Forwarded-For still spends its own counter.
    let direct = spoofable(None);
    assert_eq!(
        send(&direct, from("203.0.113.5", "1.1.1.1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&direct, from("203.0.113.5", "2.2.2.2")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Behind a trusted proxy: the right-most untrusted hop is the client, whatever it forged
    // on the left.
    let proxied = spoofable(Some("10.0.0.0/8"));
    assert_eq!(
        send(&proxied, from("10.0.0.1", "9.9.9.9, 198.51.100.7"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(&proxied, from("10.0.0.1", "8.8.8.8, 198.51.100.7"))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&proxied, from("10.0.0.1", "198.51.100.8"))
            .await
            .status,
        StatusCode::OK
    );
    // Garbage: the proxy itself is the key; never a 5xx.
    for garbage in ["", "nonsense", "1.2.3", "[::1", "999.999.999.999"] {
        let reply = send(&proxied, from("10.0.0.9", garbage)).await;
        assert!(
            reply.status == StatusCode::OK || reply.status == StatusCode::TOO_MANY_REQUESTS,
            "{garbage}"
        );
    }
}

#[tokio::test]
async fn layers_on_one_memory_store_share_a_policy_by_name() {
    // Built apart (two allocations of the same policy), on one store handed over both ways:
    // the same policy name counts once, per /64 for IPv6; another /64 counts apart.
    let store = MemoryRateStore::new();
    let shared: Arc<dyn RateLimitStore> = Arc::new(store.clone());
    let first = app(RateLimitLayer::new(policy(4, Duration::from_secs(60))).with_store(store));
    let second =
        app(RateLimitLayer::new(policy(4, Duration::from_secs(60))).with_shared_store(shared));
    let mut allowed = 0;
    for i in 0..8 {
        let target = if i % 2 == 0 { &first } else { &second };
        let ip = if i % 4 < 2 {
            "2001:db8::1"
        } else {
            "2001:db8::ffff"
        };
        allowed += usize::from(hit(target, ip).await.status == StatusCode::OK);
    }
    assert_eq!(allowed, 4, "one /64, one policy name: one count");
    assert_eq!(hit(&first, "2001:db8:0:1::1").await.status, StatusCode::OK);
    assert_eq!(hit(&second, "198.51.100.1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn tenants_have_separate_counters() {
    let app = app(RateLimitLayer::new(policy(1, Duration::from_secs(60))));
    let with_tenant = |name: &str| {
        let mut request = request_from("198.51.100.1", "/");
        request.extensions_mut().insert(Tenant::new(name).unwrap());
        request
    };
    assert_eq!(send(&app, with_tenant("acme")).await.status, StatusCode::OK);
    assert_eq!(
        send(&app, with_tenant("acme")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&app, with_tenant("globex")).await.status,
        StatusCode::OK,
        "acme cannot spend globex's quota"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis: shared counts, the over-limit cache, outages.

fn redis_layer(backend: &RedisBackend, limit: u32, algorithm: Algorithm) -> RateLimitLayer {
    RateLimitLayer::new(policy(limit, Duration::from_secs(60)).with_algorithm(algorithm))
        .with_redis(backend.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_instances_share_one_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    for algorithm in [
        Algorithm::SlidingWindow,
        Algorithm::SlidingLog,
        Algorithm::Gcra,
    ] {
        server.cli(&["FLUSHALL"]);
        // Two instances, each with its own connection.
        let a = app(redis_layer(
            &RedisBackend::new(&server.url()).unwrap(),
            10,
            algorithm,
        ));
        let b = app(redis_layer(
            &RedisBackend::new(&server.url()).unwrap(),
            10,
            algorithm,
        ));
        let mut allowed = 0;
        for i in 0..30 {
            let target = if i % 2 == 0 { &a } else { &b };
            allowed += usize::from(hit(target, "198.51.100.1").await.status == StatusCode::OK);
        }
        assert_eq!(allowed, 10, "{algorithm:?}");
    }
}

#[tokio::test]
async fn redis_counts_ipv6_clients_per_64() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = app(redis_layer(
        &RedisBackend::new(&server.url()).unwrap(),
        2,
        Algorithm::SlidingWindow,
    ));
    assert_eq!(hit(&app, "2001:db8::1").await.status, StatusCode::OK);
    assert_eq!(hit(&app, "2001:db8::ffff:2").await.status, StatusCode::OK);
    assert_eq!(
        hit(&app, "2001:db8::3").await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "one /64, one count"
    );
    assert_eq!(hit(&app, "2001:db8:0:1::1").await.status, StatusCode::OK);
    let mut keys: Vec<String> = server.cli(&["--scan"]).lines().map(str::to_owned).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "turnstile:default:rl:test:sliding-window:2001:db8:0:1::",
            "turnstile:default:rl:test:sliding-window:2001:db8::",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_limit_flood_costs_almost_no_round_trips() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let app = app(redis_layer(&backend, 5, Algorithm::SlidingWindow));
    for _ in 0..5 {
        assert_eq!(hit(&app, "198.51.100.1").await.status, StatusCode::OK);
    }
    let before = backend.status().round_trips;
    let monitor = server.monitor();
    let flood = 2000;
    for _ in 0..flood {
        assert_eq!(
            hit(&app, "198.51.100.1").await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    let round_trips = backend.status().round_trips - before;
    let commands = monitor.take().len();
    let per_denied = commands as f64 / f64::from(flood);
    eprintln!(
        "over-limit flood: {flood} denied requests, {round_trips} round trips, {commands} commands ({per_denied:.4}/request)"
    );
    assert!(
        per_denied <= 0.01,
        "{commands} commands for {flood} denied requests"
    );
    assert_eq!(round_trips, commands as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_memory_and_recovers() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::builder(server.url())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(2)
                .open_for(Duration::from_millis(200)),
        )
        .build()
        .unwrap();
    let store = RedisRateStore::new(backend.clone()).with_timeout(Duration::from_millis(50));
    let layer = RateLimitLayer::new(policy(4, Duration::from_secs(60)))
        .with_store(store)
        .with_fallback(Fallback::Local { share: 0.5 });
    let app = app(layer.clone());
    assert_eq!(hit(&app, "198.51.100.1").await.status, StatusCode::OK);

    server.pause();
    // A frozen Redis: each decision waits at most the deadline, then the breaker opens and
    // decisions are immediate; all come from the local limiter with half the quota.
    let mut statuses = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let started = Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(5), hit(&app, "198.51.100.2"))
            .await
            .expect("no hang");
        slowest = slowest.max(started.elapsed());
        statuses.push(reply.status);
    }
    eprintln!("while Redis was frozen: slowest decision {slowest:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        2,
        "half of 4: {statuses:?}"
    );
    assert!(statuses.iter().all(|s| !s.is_server_error()));
    assert!(layer.is_falling_back());
    let snapshot = backend.status();
    assert!(
        snapshot.rejected >= 3,
        "the open breaker answered without waiting: {snapshot:?}"
    );

    server.resume();
    // Back to Redis by itself: the shared count (1 spent before the outage) is there again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let reply = hit(&app, "198.51.100.1").await;
        if !layer.is_falling_back() && reply.status == StatusCode::OK {
            assert!(
                header(&reply, "ratelimit").unwrap().contains(";r=2;"),
                "shared count resumed: {:?}",
                header(&reply, "ratelimit")
            );
            break;
        }
        assert!(Instant::now() < deadline, "did not return to Redis");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_open_and_fail_closed() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let open =
        app(redis_layer(&backend, 1, Algorithm::SlidingWindow).with_fallback(Fallback::Open));
    let closed =
        app(redis_layer(&backend, 1, Algorithm::SlidingWindow).with_fallback(Fallback::Closed));
    server.stop();
    for _ in 0..3 {
        assert_eq!(hit(&open, "198.51.100.1").await.status, StatusCode::OK);
        let reply = hit(&closed, "198.51.100.1").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.body, "rate limiter unavailable\n");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis with a local quota lease.

fn leased_layer(
    backend: &RedisBackend,
    quota: Quota,
    algorithm: Algorithm,
    lease: Lease,
) -> RateLimitLayer {
    RateLimitLayer::new(
        Policy::new("test", quota)
            .unwrap()
            .with_algorithm(algorithm),
    )
    .with_redis(backend.clone())
    .with_lease(lease)
}

/// Decisions Redis made: each `EVALSHA`, less those refused because the script was not loaded
/// yet (each followed by a `SCRIPT LOAD` and the same `EVALSHA` again).
fn decisions(commands: &[String]) -> usize {
    let count = |name: &str| commands.iter().filter(|c| c.starts_with(name)).count();
    count("EVALSHA") - count("SCRIPT LOAD")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_takes_the_quota_in_batches() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let quota = Quota::per_minute(1000);
    let app = app(leased_layer(
        &backend,
        quota,
        Algorithm::SlidingWindow,
        Lease::new(10),
    ));
    let monitor = server.monitor();
    for served in 1..=100 {
        let reply = hit(&app, "198.51.100.1").await;
        assert_eq!(reply.status, StatusCode::OK);
        // What Redis has left plus what this instance holds: the same as without a lease.
        let state = header(&reply, "ratelimit").unwrap();
        assert!(
            state.starts_with(&format!("\"test\";r={};t=", 1000 - served)),
            "request {served}: {state}"
        );
    }
    assert_eq!(
        decisions(&monitor.take()),
        10,
        "100 requests, batches of 10"
    );
    // Redis counted exactly the ten batches.
    let store = RedisRateStore::new(backend);
    let key = CounterKey::new(
        Tenant::default(),
        "test:sliding-window",
        "198.51.100.1".parse::<std::net::IpAddr>().unwrap(),
    );
    let counted = store
        .check(&Check::new(key, quota, Algorithm::SlidingWindow, 0))
        .await
        .unwrap();
    assert_eq!(counted.remaining, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_grants_the_last_units_one_by_one() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    for algorithm in [
        Algorithm::SlidingWindow,
        Algorithm::SlidingLog,
        Algorithm::Gcra,
    ] {
        server.cli(&["FLUSHALL"]);
        let app = app(leased_layer(
            &backend,
            Quota::per_minute(12),
            algorithm,
            Lease::new(5),
        ));
        let monitor = server.monitor();
        let mut allowed = 0;
        for _ in 0..12 {
            let reply = hit(&app, "198.51.100.1").await;
            assert_eq!(reply.status, StatusCode::OK, "{algorithm:?}");
            allowed += 1;
        }
        assert_eq!(allowed, 12);
        let denied = hit(&app, "198.51.100.1").await;
        assert_eq!(
            denied.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{algorithm:?}"
        );
        // The retry time is the one of a single request, not of a batch.
        let retry: u64 = header(&denied, "retry-after").unwrap().parse().unwrap();
        let expected = match algorithm {
            // GCRA frees one unit every 5 s.
            Algorithm::Gcra => 1..=5,
            _ => 1..=120,
        };
        assert!(expected.contains(&retry), "{algorithm:?}: {retry}");
        // Two batches, then two units one by one (a refused batch and a check each), then
        // the refused batch and the refused check; the denial is then remembered.
        for _ in 0..5 {
            assert_eq!(
                hit(&app, "198.51.100.1").await.status,
                StatusCode::TOO_MANY_REQUESTS
            );
        }
        assert_eq!(decisions(&monitor.take()), 2 + 2 * 2 + 2, "{algorithm:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_overshoot_stays_within_its_bound() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // Two instances, each with its own connection; an exact algorithm, so that every grant
    // past the quota is the lease's.
    let window = Duration::from_millis(400);
    let (limit, units) = (20_u64, 4_u64);
    let quota = Quota::new(limit, window).unwrap();
    let lease = Lease::new(units);
    let layers: Vec<RateLimitLayer> = (0..2)
        .map(|_| {
            // A deadline no stall of this busy machine reaches: a timed-out check would be
            // decided by the local fallback, with a quota of its own.
            let store = RedisRateStore::new(RedisBackend::new(&server.url()).unwrap())
                .with_timeout(Duration::from_secs(5));
            RateLimitLayer::new(
                Policy::new("test", quota)
                    .unwrap()
                    .with_algorithm(Algorithm::SlidingLog),
            )
            .with_store(store)
            .with_lease(lease)
        })
        .collect();
    let instances: Vec<Router> = layers.iter().cloned().map(app).collect();
    let start = Instant::now();
    let run = Duration::from_millis(1600);
    let mut clients = Vec::new();
    for client in 0..8 {
        let app = instances[client % 2].clone();
        clients.push(tokio::spawn(async move {
            let mut granted = Vec::new();
            while start.elapsed() < run {
                let sent = start.elapsed();
                if hit(&app, "198.51.100.1").await.status == StatusCode::OK {
                    // Decided (in Redis or from the lease) somewhere in between.
                    granted.push((sent, start.elapsed()));
                }
            }
            granted
        }));
    }
    let mut granted = Vec::new();
    for client in clients {
        granted.extend(client.await.unwrap());
    }
    granted.sort();
    // Only grants certainly decided within a window-long span are counted in it: the count
    // is never more than the true one, so passing proves the bound, whatever the latencies.
    let bound = limit + 2 * (units - 1);
    let busiest = granted
        .iter()
        .map(|&(from, _)| {
            granted
                .iter()
                .filter(|&&(sent, received)| sent >= from && received < from + window)
                .count() as u64
        })
        .max()
        .unwrap_or(0);
    let span = window;
    eprintln!(
        "lease drill: {} grants in {run:?}, busiest {span:?} span {busiest} (quota {limit}, bound {bound}), fallback decisions {}",
        granted.len(),
        layers
            .iter()
            .map(RateLimitLayer::fallback_decisions)
            .sum::<u64>()
    );
    assert!(
        busiest <= bound,
        "{busiest} grants in one window, bound {bound}"
    );
    // Lost units are bounded too: 4 windows at the quota, less what expiring batches waste.
    assert!(
        granted.len() as u64 >= 3 * (limit - 2 * (units - 1)),
        "{}",
        granted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_falls_back_while_redis_is_down() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let layer = leased_layer(
        &backend,
        Quota::per_minute(3),
        Algorithm::SlidingWindow,
        Lease::new(2),
    );
    let app = app(layer.clone());
    server.stop();
    let statuses: Vec<StatusCode> = futures_statuses(&app, 5).await;
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "the local fallback's quota"
    );
    assert!(layer.fallback_decisions() >= 5);
}

async fn futures_statuses(app: &Router, n: usize) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(hit(app, "198.51.100.1").await.status);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_keeps_tenants_apart() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let app = app(leased_layer(
        &backend,
        Quota::per_minute(6),
        Algorithm::SlidingWindow,
        Lease::new(4),
    ));
    assert_eq!(allowed_of(&app, "acme", "198.51.100.1", 10).await, 6);
    assert_eq!(allowed_of(&app, "globex", "198.51.100.1", 10).await, 6);
}

// ---------------------------------------------------------------------------------------------
// Tenants: plans and the tenant-wide limit, on memory and Redis.

fn tenant_request(tenant: &str, ip: &str) -> Request<Body> {
    let mut request = request_from(ip, "/");
    request
        .extensions_mut()
        .insert(Tenant::new(tenant).unwrap());
    request
}

async fn allowed_of(app: &Router, tenant: &str, ip: &str, attempts: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..attempts {
        allowed +=
            usize::from(send(app, tenant_request(tenant, ip)).await.status == StatusCode::OK);
    }
    allowed
}

async fn per_tenant_quotas(store: Option<RedisRateStore>) {
    let plans = std::collections::HashMap::from([("acme", 4_u32), ("trial", 1)]);
    let policy = policy(2, Duration::from_secs(60))
        .with_quota_for(move |tenant| plans.get(tenant.as_str()).map(|n| Quota::per_minute(*n)));
    let mut layer = RateLimitLayer::new(policy);
    if let Some(store) = store {
        layer = layer.with_store(store);
    }
    let app = app(layer);
    let reply = send(&app, tenant_request("acme", "198.51.100.1")).await;
    assert_eq!(
        header(&reply, "ratelimit-policy"),
        Some("\"test\";q=4;w=60"),
        "the plan's quota is reported"
    );
    assert_eq!(allowed_of(&app, "acme", "198.51.100.1", 10).await, 3);
    assert_eq!(allowed_of(&app, "trial", "198.51.100.1", 10).await, 1);
    assert_eq!(
        allowed_of(&app, "globex", "198.51.100.1", 10).await,
        2,
        "unknown tenants get the default"
    );
}

async fn tenant_wide_limit(store: Option<RedisRateStore>) {
    let mut per_ip = RateLimitLayer::new(policy(5, Duration::from_secs(60)));
    let mut tenant_wide =
        RateLimitLayer::new(Policy::tenant_wide("tenant", Quota::per_minute(6)).unwrap());
    if let Some(store) = store {
        let shared: Arc<dyn tower_turnstile::ratelimit::RateLimitStore> = Arc::new(store);
        per_ip = per_ip.with_shared_store(Arc::clone(&shared));
        tenant_wide = tenant_wide.with_shared_store(shared);
    }
    // The tenant-wide counter outside (it protects everyone), the per-client one inside.
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(per_ip)
        .layer(tenant_wide);
    let mut noisy = 0;
    for client in 1..=3 {
        noisy += allowed_of(&app, "noisy", &format!("198.51.100.{client}"), 3).await;
    }
    assert_eq!(
        noisy, 6,
        "three clients under their own limit still share the tenant's 6"
    );
    assert_eq!(
        allowed_of(&app, "quiet", "198.51.100.1", 3).await,
        3,
        "another tenant is unaffected"
    );
}

#[tokio::test]
async fn memory_per_tenant_quotas() {
    per_tenant_quotas(None).await;
}

#[tokio::test]
async fn memory_tenant_wide_limit() {
    tenant_wide_limit(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_per_tenant_quotas() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    per_tenant_quotas(Some(RedisRateStore::new(
        RedisBackend::new(&server.url()).unwrap(),
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tenant_wide_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    tenant_wide_limit(Some(RedisRateStore::new(
        RedisBackend::new(&server.url()).unwrap(),
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_then_restarted_shares_counts_again() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let instance = || {
        let backend = RedisBackend::builder(server.url())
            .breaker(
                BreakerConfig::default()
                    .failure_threshold(1)
                    .open_for(Duration::from_millis(100)),
            )
            .build()
            .unwrap();
        let layer = RateLimitLayer::new(policy(4, Duration::from_secs(60))).with_redis(backend);
        (app(layer.clone()), layer)
    };
    let ((a, layer_a), (b, layer_b)) = (instance(), instance());
    assert_eq!(hit(&a, "198.51.100.1").await.status, StatusCode::OK);

    server.stop();
    // Decisions go on from memory, each instance on its own: no 5xx, no hang.
    for target in [&a, &b, &a, &b] {
        let reply = tokio::time::timeout(Duration::from_secs(5), hit(target, "198.51.100.9"))
            .await
            .expect("no hang");
        assert!(!reply.status.is_server_error(), "{:?}", reply.status);
    }
    assert!(layer_a.is_falling_back());

    server.restart();
    // Back to Redis by itself. The restarted Redis starts empty; from now on both instances
    // spend from one count again.
    // Each instance has its own connection and breaker: wait until both have come back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while layer_a.is_falling_back() || layer_b.is_falling_back() {
        assert!(Instant::now() < deadline, "did not return to Redis");
        tokio::time::sleep(Duration::from_millis(150)).await;
        hit(&a, "198.51.100.250").await;
        hit(&b, "198.51.100.250").await;
    }
    let mut allowed = 0;
    for i in 0..10 {
        let target = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(hit(target, "198.51.100.77").await.status == StatusCode::OK);
    }
    assert_eq!(allowed, 4, "one shared count across both instances");
}

// ---------------------------------------------------------------------------------------------
// Shadow limits.

/// A shadow layer decides and sends the fields as the real one would, counts what it would
/// refuse, and refuses nobody; the same layer without the shadow refuses. On memory and Redis.
async fn a_shadow_refuses_nobody(store: impl RateLimitStore + Clone) {
    let shadow = RateLimitLayer::new(policy(2, Duration::from_secs(60)))
        .with_store(store.clone())
        .with_shadow(true);
    let shadowed = app(shadow.clone());
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let reply = hit(&shadowed, "198.51.100.7").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(header(&reply, "retry-after").is_none());
        remaining.push(header(&reply, "ratelimit").unwrap().to_owned());
    }
    assert!(remaining[0].starts_with("\"test\";r=1;"), "{remaining:?}");
    assert!(
        remaining[2..].iter().all(|r| r.starts_with("\"test\";r=0")),
        "{remaining:?}"
    );
    assert_eq!(shadow.shadow_refusals(), 3);
    assert!(shadow.is_shadow());

    // The same count, enforced: the key has spent its quota.
    let enforced = RateLimitLayer::new(policy(2, Duration::from_secs(60))).with_store(store);
    assert_eq!(enforced.shadow_refusals(), 0);
    let reply = hit(&app(enforced), "198.51.100.7").await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn memory_a_shadow_limit_refuses_nobody() {
    a_shadow_refuses_nobody(MemoryRateStore::new()).await;
}

#[tokio::test]
async fn redis_a_shadow_limit_refuses_nobody() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    a_shadow_refuses_nobody(RedisRateStore::new(
        RedisBackend::new(&server.url()).unwrap(),
    ))
    .await;
}

// ---------------------------------------------------------------------------------------------
// Allowlist and skip.

/// Allowlisted addresses and keys, and skipped requests, are never limited, counted, or given
/// the `RateLimit` fields; everyone else is limited as before.
#[tokio::test]
async fn allowlisted_clients_and_skipped_requests_are_not_limited() {
    use tower_turnstile::ratelimit::Allowlist;

    let allow = Allowlist::new()
        .with_cidr("10.0.0.0/8")
        .unwrap()
        .with_cidr("2001:db8::/32")
        .unwrap();
    let by_ip = policy(1, Duration::from_secs(60))
        .with_allowlist(allow)
        .with_skip(|request| request.uri.path() == "/other");
    let by_ip = app(RateLimitLayer::new(by_ip));
    for _ in 0..3 {
        for ip in ["10.1.2.3", "2001:db8::7"] {
            let reply = hit(&by_ip, ip).await;
            assert_eq!(reply.status, StatusCode::OK, "{ip}");
            assert!(header(&reply, "ratelimit").is_none(), "not counted: {ip}");
        }
        let skipped = send(&by_ip, request_from("198.51.100.9", "/other")).await;
        assert_eq!(skipped.status, StatusCode::OK);
        assert!(header(&skipped, "ratelimit").is_none());
    }
    assert_eq!(hit(&by_ip, "198.51.100.9").await.status, StatusCode::OK);
    assert_eq!(
        hit(&by_ip, "198.51.100.9").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(hit(&by_ip, "11.0.0.1").await.status, StatusCode::OK);
    assert_eq!(
        hit(&by_ip, "11.0.0.1").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // A key allowlist, on a header key.
    let by_key = policy(1, Duration::from_secs(60))
        .with_key(HeaderKey::new(header::HeaderName::from_static("x-api-key")))
        .with_allowlist(Allowlist::new().with_key("monitor"));
    let keyed = app(RateLimitLayer::new(by_key));
    let with_key = |key: &str| {
        let mut request = request_from("198.51.100.9", "/");
        request
            .headers_mut()
            .insert("x-api-key", HeaderValue::from_str(key).unwrap());
        request
    };
    for _ in 0..3 {
        assert_eq!(
            send(&keyed, with_key("monitor")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        send(&keyed, with_key("someone")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&keyed, with_key("someone")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert!(Allowlist::new().with_cidr("10.0.0.0/33").is_err());
    assert!(Allowlist::new().with_cidr("internal").is_err());
}
