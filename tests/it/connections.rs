//! Live connections across instances: the registry on a real `redis-server`, and the
//! reference app's `/ws` and `/notify` over real TCP with a real WebSocket client
//! (tokio-tungstenite).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, to_bytes},
    http::{Method, Request, StatusCode, header},
};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{self, Message, client::IntoClientRequest, protocol::frame::coding::CloseCode},
};
use tower::ServiceExt;
use tower_turnstile::{
    backend::RedisBackend,
    connection::{Event, RegisterError, Registry},
    ratelimit::Quota,
    tenant::Tenant,
};

use crate::axum_app::{Config, build_parts};
use crate::support::RedisServer;

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// One instance of the reference app, served on a loopback port.
struct Instance {
    router: Router,
    address: SocketAddr,
    registry: Registry,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn instance(config: &Config) -> Instance {
    let built = build_parts(config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = built.router.clone();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            served.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Instance {
        router: built.router,
        address,
        registry: built.connections,
        server,
    }
}

fn config(redis: &RedisServer, max_per_user: u32) -> Config {
    Config {
        redis_url: Some(redis.url()),
        rate_limit: Quota::per_second(100_000),
        ws_max_per_user: max_per_user,
        ..Config::default()
    }
}

/// `POST` a form in process; returns the status, the body and the session cookie set.
async fn post(
    app: &Router,
    host: &str,
    path: &str,
    form: &str,
) -> (StatusCode, String, Option<String>) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let status = response.status();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap(), cookie)
}

async fn login(app: &Router, host: &str, user: &str) -> String {
    let (status, _, cookie) = post(app, host, "/login", &format!("user={user}")).await;
    assert_eq!(status, StatusCode::OK);
    cookie.expect("a login sets the cookie")
}

async fn notify(app: &Router, host: &str, user: &str, message: &str) -> String {
    let (status, body, _) = post(
        app,
        host,
        "/notify",
        &format!("user={user}&message={message}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn connect(
    at: &Instance,
    host: &str,
    cookie: Option<&str>,
) -> Result<Socket, tungstenite::Error> {
    let mut request = format!("ws://{}/ws", at.address)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert(header::HOST, host.parse().unwrap());
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert(header::COOKIE, cookie.parse().unwrap());
    }
    let (socket, _) = connect_async(request).await?;
    Ok(socket)
}

/// The next text frame, or `None` within `wait`.
async fn next_text(socket: &mut Socket, wait: Duration) -> Option<String> {
    loop {
        match tokio::time::timeout(wait, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(text.to_string()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            _ => return None,
        }
    }
}

fn status_of(error: &tungstenite::Error) -> Option<u16> {
    match error {
        tungstenite::Error::Http(response) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// A user connected to A gets a `/notify` sent through B; with connections on both, both get
/// it; another tenant's user of the same name gets nothing. Without a login, `/ws` is `401`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_through_one_instance_reaches_every_connection_of_the_user() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (
        instance(&config(&redis, 5)).await,
        instance(&config(&redis, 5)).await,
    );
    let acme = "acme.localhost";
    let cookie = login(&a.router, acme, "alice").await;
    let mut on_a = connect(&a, acme, Some(&cookie)).await.unwrap();
    assert_eq!(notify(&b.router, acme, "alice", "hello").await, "1");
    assert_eq!(
        next_text(&mut on_a, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("hello")
    );

    let mut on_b = connect(&b, acme, Some(&cookie)).await.unwrap();
    let other = login(&a.router, "globex.localhost", "alice").await;
    let mut elsewhere = connect(&a, "globex.localhost", Some(&other)).await.unwrap();
    assert_eq!(notify(&b.router, acme, "alice", "both").await, "2");
    assert_eq!(
        next_text(&mut on_a, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("both")
    );
    assert_eq!(
        next_text(&mut on_b, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("both")
    );
    assert_eq!(
        next_text(&mut elsewhere, Duration::from_millis(300)).await,
        None,
        "another tenant"
    );
    assert_eq!(notify(&a.router, acme, "nobody", "x").await, "0");

    let refused = connect(&a, acme, None).await.unwrap_err();
    assert_eq!(status_of(&refused), Some(401));
}

/// At most `WS_MAX_PER_USER` live connections per user across both instances under
/// concurrent connects; a slot frees when a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_holds_across_instances_and_frees_on_close() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (
        instance(&config(&redis, 3)).await,
        instance(&config(&redis, 3)).await,
    );
    let host = "acme.localhost";
    let cookie = login(&a.router, host, "bob").await;
    let attempts = (0..8).map(|i| {
        let at = if i % 2 == 0 { &a } else { &b };
        connect(at, host, Some(&cookie))
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut open: Vec<Socket> = Vec::new();
    for result in results {
        match result {
            Ok(socket) => open.push(socket),
            Err(error) => assert_eq!(status_of(&error), Some(429), "{error}"),
        }
    }
    assert_eq!(open.len(), 3, "exactly the cap");
    let refused = connect(&a, host, Some(&cookie)).await.unwrap_err();
    assert_eq!(status_of(&refused), Some(429));

    let mut closing = open.pop().unwrap();
    closing.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match connect(&b, host, Some(&cookie)).await {
            Ok(socket) => {
                open.push(socket);
                break;
            }
            Err(error) => {
                assert_eq!(status_of(&error), Some(429));
                assert!(Instant::now() < deadline, "the slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(open.len(), 3);
}

/// A graceful stop (drain) closes the instance's sockets with 1012 and removes its entries at
/// once; the client reconnecting to the other instance is found there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_instance_closes_with_1012_and_leaves_the_registry() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = (
        instance(&config(&redis, 5)).await,
        instance(&config(&redis, 5)).await,
    );
    let host = "acme.localhost";
    let cookie = login(&a.router, host, "carol").await;
    let mut socket = connect(&a, host, Some(&cookie)).await.unwrap();
    let tenant = Tenant::new("acme").unwrap();
    assert_eq!(b.registry.connections_of(&tenant, "carol").await.len(), 1);

    assert_eq!(a.registry.drain().await, 1);
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(2), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Restart));
    assert!(
        b.registry.connections_of(&tenant, "carol").await.is_empty(),
        "gone at once"
    );
    let refused = connect(&a, host, Some(&cookie)).await.unwrap_err();
    assert_eq!(status_of(&refused), Some(503));

    let mut again = connect(&b, host, Some(&cookie)).await.unwrap();
    assert_eq!(b.registry.connections_of(&tenant, "carol").await.len(), 1);
    assert_eq!(notify(&a.router, host, "carol", "moved").await, "1");
    assert_eq!(
        next_text(&mut again, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("moved")
    );
}

fn registry(redis: &RedisServer, lease: Duration) -> Registry {
    Registry::builder(RedisBackend::new(&redis.url()).unwrap())
        .lease(lease)
        .build()
        .unwrap()
}

/// An instance that dies without deregistering: its entries vanish within one lease, and its
/// slots free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_vanishes_within_its_lease() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_millis(900);
    let tenant = Tenant::default();
    let (doomed, survivor) = (registry(&redis, lease), registry(&redis, lease));
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            doomed
                .register_capped(&tenant, "dave", "{}", 2)
                .await
                .unwrap(),
        );
    }
    assert!(matches!(
        survivor.register_capped(&tenant, "dave", "{}", 2).await,
        Err(RegisterError::AtCapacity { limit: 2, live: 2 })
    ));
    // Renewed past its first lease while alive.
    tokio::time::sleep(lease + lease / 2).await;
    assert_eq!(survivor.connections_of(&tenant, "dave").await.len(), 2);
    assert_eq!(survivor.count(&tenant).await, 2);

    // Dies: no renewal, no deregistration.
    held.into_iter().for_each(std::mem::forget);
    let inbox = format!("turnstile:inbox:{}", doomed.instance());
    let died = Instant::now();
    drop(doomed);
    // A message sent to it meanwhile does not leave its inbox behind for good.
    assert_eq!(survivor.send_to_user(&tenant, "dave", "late").await, 2);
    let ttl: i64 = redis.cli(&["PTTL", &inbox]).trim().parse().unwrap();
    assert!(ttl > 0, "the dead instance's inbox expires: {ttl}");
    while !survivor.connections_of(&tenant, "dave").await.is_empty() {
        assert!(
            died.elapsed() < lease * 3,
            "still listed after {:?}",
            died.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let vanished = died.elapsed();
    eprintln!("a dead instance's entries vanished {vanished:?} after it died (lease {lease:?})");
    // Held until counted: dropping it would deregister it, racing the count.
    let registered = survivor.register_capped(&tenant, "dave", "{}", 2).await;
    assert!(registered.is_ok(), "slots free");
    assert_eq!(survivor.count(&tenant).await, 1);
    drop(registered);
}

/// Redis down: registrations and delivery work on this instance, nothing panics; once Redis is
/// back (empty), the renewal registers every live connection again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_keeps_local_delivery_and_the_registry_is_rebuilt() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_millis(600);
    let tenant = Tenant::default();
    let here = registry(&redis, lease);
    let mut first = here.register(&tenant, "erin", "one").await.unwrap();

    redis.stop();
    let mut second = here.register(&tenant, "erin", "two").await.unwrap();
    assert_eq!(here.send_to_user(&tenant, "erin", "local").await, 2);
    for connection in [&mut first, &mut second] {
        assert_eq!(
            connection.next().await,
            Some(Event::Message("local".into()))
        );
    }
    assert_eq!(
        here.connections_of(&tenant, "erin").await.len(),
        2,
        "local view"
    );

    redis.restart();
    let other = registry(&redis, lease);
    let back = Instant::now();
    loop {
        let listed = other.connections_of(&tenant, "erin").await;
        if listed.len() == 2 {
            let mut metas: Vec<_> = listed.iter().map(|c| c.meta.as_str()).collect();
            metas.sort_unstable();
            assert_eq!(metas, ["one", "two"]);
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not rebuilt: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(other.send_to_user(&tenant, "erin", "remote").await, 2);
    assert_eq!(first.next().await, Some(Event::Message("remote".into())));
    assert_eq!(second.next().await, Some(Event::Message("remote".into())));
}

/// Delivery from one instance to connections on another, at a few hundred connections: every
/// message arrives; the latency is printed (p50, p99), with the Redis memory per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_across_instances_at_a_few_hundred_connections() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_secs(30);
    let (sender, receiver) = (registry(&redis, lease), registry(&redis, lease));
    let tenant = Tenant::default();
    let before: i64 = info_used_memory(&redis);
    let mut connections = Vec::new();
    for user in 0..60 {
        for _ in 0..5 {
            let registration = receiver
                .register(&tenant, &format!("user{user}"), "{\"kind\":\"ws\"}")
                .await
                .unwrap();
            connections.push((user, registration));
        }
    }
    let per_connection = (info_used_memory(&redis) - before) / 300;
    let mut latencies = Vec::new();
    for round in 0..200 {
        let user = round % 60;
        let sent = Instant::now();
        let reached = sender
            .send_to_user(&tenant, &format!("user{user}"), &round.to_string())
            .await;
        assert_eq!(reached, 5);
        for (_, registration) in connections.iter_mut().filter(|(u, _)| *u == user) {
            let event = tokio::time::timeout(Duration::from_secs(2), registration.next())
                .await
                .expect("delivered");
            assert_eq!(event, Some(Event::Message(round.to_string())));
        }
        latencies.push(sent.elapsed());
    }
    latencies.sort_unstable();
    eprintln!(
        "delivery A→B at 300 connections: p50 {:?}, p99 {:?}; Redis memory about {per_connection} bytes per connection",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );
}

fn info_used_memory(redis: &RedisServer) -> i64 {
    redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// On a Redis Cluster: registrations, caps, listing and delivery work with a user's keys on one
/// slot and the tenant's count and each instance's inbox on others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_works_on_a_cluster() {
    let Some(cluster) = crate::support::RedisCluster::start_masters_only() else {
        return;
    };
    let make = || {
        Registry::builder(RedisBackend::cluster(cluster.urls()).unwrap())
            .lease(Duration::from_secs(2))
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    let tenant = Tenant::new("acme").unwrap();
    let mut held = Vec::new();
    for user in ["u1", "u2", "u3", "u4"] {
        held.push(a.register_capped(&tenant, user, "a", 1).await.unwrap());
        assert!(matches!(
            b.register_capped(&tenant, user, "b", 1).await,
            Err(RegisterError::AtCapacity { .. })
        ));
    }
    assert_eq!(b.count(&tenant).await, 4);
    assert_eq!(b.connections_of(&tenant, "u3").await.len(), 1);
    for (user, registration) in ["u1", "u2", "u3", "u4"].iter().zip(held.iter_mut()) {
        assert_eq!(b.send_to_user(&tenant, user, user).await, 1);
        let event = tokio::time::timeout(Duration::from_secs(2), registration.next()).await;
        assert_eq!(event.unwrap(), Some(Event::Message((*user).to_owned())));
    }
    // Renewal across slots keeps them past their lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.count(&tenant).await, 4);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.count(&tenant).await > 0 {
        assert!(Instant::now() < deadline, "deregistered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What renewal costs Redis, counted by Redis: commands per second for 1000 connections of
/// 1000 users on one instance (and the inbox reads), over two renewal periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_load_per_thousand_connections() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_millis(1500);
    let here = registry(&redis, lease);
    let tenant = Tenant::default();
    let mut held = Vec::new();
    for user in 0..1000 {
        held.push(
            here.register(&tenant, &format!("user{user}"), "")
                .await
                .unwrap(),
        );
    }
    // Every command Redis ran (inside scripts too), and the `EVAL`s the instance sent.
    let calls = |redis: &RedisServer| -> (u64, u64) {
        let stats = redis.cli(&["INFO", "commandstats"]);
        let count = |line: &str| -> Option<u64> {
            line.split("calls=").nth(1)?.split(',').next()?.parse().ok()
        };
        let all = stats.lines().filter_map(count).sum();
        let evals = stats
            .lines()
            .filter(|line| line.starts_with("cmdstat_eval:"))
            .filter_map(count)
            .sum();
        (all, evals)
    };
    let (before, start) = (calls(&redis), Instant::now());
    tokio::time::sleep(lease / 3 * 2 + Duration::from_millis(50)).await;
    let (after, took) = (calls(&redis), start.elapsed());
    let renewals = 2.0;
    let executed = (after.0 - before.0) as f64 / renewals;
    let sent = (after.1 - before.1) as f64 / renewals;
    eprintln!(
        "renewal of 1000 connections of 1000 users: {sent:.0} EVALs sent and {executed:.0} commands \
         run by Redis per renewal (inbox reads included; measured over {took:?}); at the default \
         30 s lease (a renewal every 10 s): about {:.0} EVALs/s and {:.0} commands/s",
        sent / 10.0,
        executed / 10.0
    );
    let (before, after) = (before.0, after.0);
    assert!(after > before + 1000, "every connection was renewed");
    assert_eq!(here.count(&tenant).await, 1000);
}

/// The reference app with Redis down: `/notify` still answers (this instance's connections),
/// `/ws` still opens, nothing is a `5xx`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_answers_with_redis_down() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let a = instance(&config(&redis, 5)).await;
    let host = "acme.localhost";
    let cookie = login(&a.router, host, "frank").await;
    let mut socket = connect(&a, host, Some(&cookie)).await.unwrap();
    redis.stop();
    assert_eq!(notify(&a.router, host, "frank", "down").await, "1");
    assert_eq!(
        next_text(&mut socket, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("down")
    );
    let mut second = connect(&a, host, Some(&cookie)).await.unwrap();
    assert_eq!(notify(&a.router, host, "frank", "two").await, "2");
    assert_eq!(
        next_text(&mut second, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("two")
    );
}

/// After a drain, connections still closing are not renewed back into the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_registry_does_not_renew_its_closing_connections() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_millis(600);
    let tenant = Tenant::default();
    let (leaving, other) = (registry(&redis, lease), registry(&redis, lease));
    let mut closing = leaving.register(&tenant, "gina", "").await.unwrap();
    assert_eq!(leaving.drain().await, 1);
    assert_eq!(closing.next().await, Some(Event::Reconnect));
    assert!(matches!(
        leaving.register(&tenant, "gina", "").await,
        Err(RegisterError::Draining)
    ));
    // Two renewal periods later, still held here but not listed anywhere.
    tokio::time::sleep(lease).await;
    assert!(other.connections_of(&tenant, "gina").await.is_empty());
    assert_eq!(leaving.local_count(), 1);
    drop(closing);
    assert_eq!(leaving.local_count(), 0);
}

/// `InFlightLimitLayer`: at most 2 requests of one key in flight over two instances; the
/// rest get `429` with the `concurrent-requests` quota; another key is not held up, and a slot
/// is free again as soon as its request has been answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_capped_across_instances() {
    use axum::routing::get;
    use tower_turnstile::ratelimit::{HeaderKey, InFlightLimitLayer};

    let Some(redis) = RedisServer::start() else {
        return;
    };
    let make = || {
        let limit = InFlightLimitLayer::new(registry(&redis, Duration::from_secs(5)), 2)
            .with_key(HeaderKey::new(header::HeaderName::from_static("x-client")));
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "done"
                }),
            )
            .layer(limit)
    };
    let (a, b) = (make(), make());
    let call = |app: Router, client: &'static str| async move {
        let request = Request::get("/slow")
            .header("x-client", client)
            .body(Body::empty())
            .unwrap();
        app.oneshot(request).await.unwrap()
    };
    let mut calls: Vec<_> = (0..6)
        .map(|i| call(if i % 2 == 0 { a.clone() } else { b.clone() }, "c1"))
        .collect();
    calls.push(call(a.clone(), "c2"));
    let responses = futures_util::future::join_all(calls).await;
    let (other, same) = responses.split_last().unwrap();
    assert_eq!(other.status(), StatusCode::OK, "another key is not held up");
    let ok = same.iter().filter(|r| r.status() == StatusCode::OK).count();
    assert_eq!(ok, 2, "exactly the cap");
    for refused in same.iter().filter(|r| r.status() != StatusCode::OK) {
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = refused.headers();
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert_eq!(
            headers["ratelimit-policy"],
            "\"concurrency\";q=2;qu=\"concurrent-requests\""
        );
        assert_eq!(headers["ratelimit"], "\"concurrency\";r=0");
    }
    for round in 0..3 {
        let app = if round % 2 == 0 { &a } else { &b };
        assert_eq!(
            call(app.clone(), "c1").await.status(),
            StatusCode::OK,
            "slots free at once"
        );
    }
}

/// Two instances of the app with `config`.
async fn pair(config: &Config) -> (Instance, Instance) {
    (instance(config).await, instance(config).await)
}

/// `POST` as the holder of `cookie`; returns the status.
async fn post_as(app: &Router, host: &str, path: &str, cookie: &str) -> StatusCode {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, host)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

/// How long until the server closes `socket` with "session ended" (code 1000), or `None`
/// when it does not within `wait`.
async fn closed_within(socket: &mut Socket, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let left = wait.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                assert_eq!(frame.code, CloseCode::Normal, "{frame:?}");
                assert_eq!(frame.reason, "session ended");
                return Some(start.elapsed());
            }
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

/// A logout on one instance closes the session's socket on the other within 1 s; a socket of
/// another session of the same user stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_instance_closes_the_session_socket_on_the_other() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&config(&redis, 5)).await;
    let host = "acme.localhost";
    let (laptop, phone) = (
        login(&a.router, host, "alice").await,
        login(&b.router, host, "alice").await,
    );
    let mut on_b = connect(&b, host, Some(&laptop)).await.unwrap();
    let mut phone_on_a = connect(&a, host, Some(&phone)).await.unwrap();

    assert_eq!(
        post_as(&a.router, host, "/logout", &laptop).await,
        StatusCode::OK
    );
    let took = closed_within(&mut on_b, Duration::from_secs(1)).await;
    assert!(took.is_some(), "the socket on B closes within 1 s");
    assert_eq!(notify(&b.router, host, "alice", "still").await, "1");
    assert_eq!(
        next_text(&mut phone_on_a, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("still"),
        "the other session's socket stays"
    );
}

/// "Log out everywhere" closes every socket of the user on both instances; another tenant's
/// user of the same name keeps theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_everywhere_closes_every_socket_of_the_user() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (a, b) = pair(&config(&redis, 5)).await;
    let host = "acme.localhost";
    let (laptop, phone) = (
        login(&a.router, host, "alice").await,
        login(&b.router, host, "alice").await,
    );
    let mut sockets = [
        connect(&a, host, Some(&laptop)).await.unwrap(),
        connect(&b, host, Some(&laptop)).await.unwrap(),
        connect(&a, host, Some(&phone)).await.unwrap(),
        connect(&b, host, Some(&phone)).await.unwrap(),
    ];
    let globex = login(&a.router, "globex.localhost", "alice").await;
    let mut elsewhere = connect(&b, "globex.localhost", Some(&globex))
        .await
        .unwrap();

    assert_eq!(
        post_as(&b.router, host, "/logout-all", &phone).await,
        StatusCode::OK
    );
    for (n, socket) in sockets.iter_mut().enumerate() {
        let took = closed_within(socket, Duration::from_secs(1)).await;
        assert!(took.is_some(), "socket {n} closes within 1 s");
    }
    assert_eq!(
        notify(&a.router, "globex.localhost", "alice", "kept").await,
        "1"
    );
    assert_eq!(
        next_text(&mut elsewhere, Duration::from_secs(2))
            .await
            .as_deref(),
        Some("kept"),
        "another tenant's alice keeps her socket"
    );
}

/// `MAX_SESSIONS_PER_USER=2`: a third login ends the user's oldest session, wherever it was
/// made, and its socket closes; the newer ones stay logged in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_login_over_the_cap_ends_the_oldest_session_and_its_socket() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let capped = Config {
        max_sessions_per_user: Some(2),
        ..config(&redis, 5)
    };
    let (a, b) = pair(&capped).await;
    let host = "acme.localhost";
    // Sessions are ranked by creation time in milliseconds: one login per millisecond at most.
    let pause = || tokio::time::sleep(Duration::from_millis(3));
    let oldest = login(&a.router, host, "alice").await;
    let mut socket = connect(&b, host, Some(&oldest)).await.unwrap();
    pause().await;
    let second = login(&b.router, host, "alice").await;
    pause().await;
    let third = login(&a.router, host, "alice").await;

    let took = closed_within(&mut socket, Duration::from_secs(1)).await;
    assert!(
        took.is_some(),
        "the oldest session's socket closes within 1 s"
    );
    let me = |cookie: String, at: Router| async move {
        let request = Request::get("/me")
            .header(header::HOST, host)
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap();
        at.oneshot(request).await.unwrap().status()
    };
    assert_eq!(me(oldest, b.router.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(second, a.router.clone()).await, StatusCode::OK);
    assert_eq!(me(third, b.router.clone()).await, StatusCode::OK);
}

/// On a three-master Redis Cluster: a logout on one instance of the app closes the session's
/// socket on the other, and "log out everywhere" closes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_close_with_their_session_on_a_cluster() {
    let Some(cluster) = crate::support::RedisCluster::start_masters_only() else {
        return;
    };
    let on_cluster = Config {
        redis_cluster: Some(cluster.urls()),
        rate_limit: Quota::per_second(100_000),
        ..Config::default()
    };
    let (a, b) = pair(&on_cluster).await;
    let host = "acme.localhost";
    let (laptop, phone) = (
        login(&a.router, host, "alice").await,
        login(&b.router, host, "alice").await,
    );
    let mut laptop_on_b = connect(&b, host, Some(&laptop)).await.unwrap();
    let mut phone_on_a = connect(&a, host, Some(&phone)).await.unwrap();
    assert_eq!(
        post_as(&a.router, host, "/logout", &laptop).await,
        StatusCode::OK
    );
    assert!(
        closed_within(&mut laptop_on_b, Duration::from_secs(1))
            .await
            .is_some()
    );
    assert_eq!(
        post_as(&b.router, host, "/logout-all", &phone).await,
        StatusCode::OK
    );
    assert!(
        closed_within(&mut phone_on_a, Duration::from_secs(1))
            .await
            .is_some()
    );
}
