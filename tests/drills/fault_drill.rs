//! Load with faults: two instances of the reference app on one Redis, under concurrent
//! clients (a login, then writes and reads), a flood from one address, and a stream of
//! malformed requests, while Redis is killed and restarted twice. At the end every write that
//! was answered 2xx is in Redis, no answer was a 5xx, nothing panicked, and the flood got no
//! more than the documented allowance through.
//!
//! The short form runs in CI (about 6 s); `FAULT_DRILL_SECS=60` runs a minute of load, with
//! the two outages spread over it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo};
use http::{Method, Request, StatusCode, header};

use crate::axum_app::{Config, build_parts};
use crate::support::{RedisServer, http::send};

/// Requests per minute per client address and tenant.
const LIMIT: u64 = 40;

/// One request from `peer` on `host`, with `cookie`; the status, the body, and the new cookie
/// if the answer set one.
async fn request(
    app: &Router,
    method: Method,
    path: &str,
    host: &str,
    peer: SocketAddr,
    cookie: Option<&str>,
    form: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie);
    }
    if form.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let mut request = builder
        .body(Body::from(form.unwrap_or_default().to_owned()))
        .unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    let reply = send(app, request).await;
    let cookie = reply
        .set_cookie()
        .map(|set| set.split(';').next().unwrap().to_owned());
    (reply.status, reply.body, cookie)
}

/// A malformed request: method, path, host, cookie, form.
type Malformed = (
    Method,
    &'static str,
    String,
    Option<String>,
    Option<&'static str>,
);

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    cookie: Option<String>,
    host: String,
    last_counter: Option<u64>,
    requests: u64,
    server_errors: u64,
    /// Counter writes that came back with a new cookie: during an outage, a write to a session
    /// the serving instance holds no copy of starts a new one (`FailurePolicy::with_restart_when_unavailable`).
    restarted: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_two_redis_restarts_under_load() {
    let Some(mut redis) = RedisServer::start_persistent() else {
        return;
    };
    let seconds: u64 = std::env::var("FAULT_DRILL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
        .max(6);
    let config = Config::from_vars([
        ("REDIS_URL", redis.url()),
        ("RATE_LIMIT", format!("{LIMIT}/60s")),
    ])
    .unwrap();
    let one = build_parts(&config).await.unwrap();
    let two = build_parts(&config).await.unwrap();
    let instances = [one.router.clone(), two.router.clone()];
    let stop = Arc::new(AtomicBool::new(false));

    // Clients: a login, then counter writes and reads, alternating between the instances.
    let mut clients = Vec::new();
    for id in 0..8u8 {
        let (instances, stop) = (instances.clone(), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let mut seen = Seen {
                host: if id % 2 == 0 {
                    "acme.localhost"
                } else {
                    "globex.localhost"
                }
                .to_owned(),
                ..Seen::default()
            };
            let peer = SocketAddr::from(([198, 51, 100, id + 1], 40000));
            let mut turn = 0usize;
            let mut logged_in = false;
            while !stop.load(Ordering::Relaxed) {
                let app = &instances[turn % 2];
                turn += 1;
                let (method, path, form) = if !logged_in {
                    (Method::POST, "/login", Some(format!("user=user{id}")))
                } else if turn.is_multiple_of(3) {
                    (Method::GET, "/counter", None)
                } else {
                    (Method::POST, "/counter", None)
                };
                let (status, body, cookie) = request(
                    app,
                    method.clone(),
                    path,
                    &seen.host,
                    peer,
                    seen.cookie.as_deref(),
                    form.as_deref(),
                )
                .await;
                seen.requests += 1;
                if status.is_server_error() {
                    seen.server_errors += 1;
                }
                if cookie.is_some() {
                    if path == "/counter" && seen.cookie.is_some() {
                        seen.restarted += 1;
                    }
                    seen.cookie = cookie;
                }
                if status.is_success() {
                    if path == "/login" {
                        logged_in = true;
                    } else if method == Method::POST {
                        seen.last_counter = body.trim().parse().ok();
                    }
                }
                // 5 a second: a client spends its quota only in runs longer than 8 s, and then
                // gets 429s, which are answers, not errors.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            seen
        }));
    }

    // The flood: one address, as fast as it goes, on both instances.
    let flood_granted = Arc::new(AtomicU64::new(0));
    let flood_errors = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    for app in &instances {
        let (app, stop) = (app.clone(), Arc::clone(&stop));
        let (granted, errors) = (Arc::clone(&flood_granted), Arc::clone(&flood_errors));
        flooders.push(tokio::spawn(async move {
            let peer = SocketAddr::from(([203, 0, 113, 9], 40000));
            while !stop.load(Ordering::Relaxed) {
                let (status, _, _) =
                    request(&app, Method::GET, "/", "acme.localhost", peer, None, None).await;
                if status == StatusCode::OK {
                    granted.fetch_add(1, Ordering::Relaxed);
                } else if status.is_server_error() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        }));
    }

    // Malformed requests: forged and oversized cookies, hosts that are no hosts, broken forms.
    let malformed_errors = Arc::new(AtomicU64::new(0));
    let malformed = {
        let (app, stop, errors) = (
            instances[1].clone(),
            Arc::clone(&stop),
            Arc::clone(&malformed_errors),
        );
        tokio::spawn(async move {
            let long = "x".repeat(8_000);
            let cases: Vec<Malformed> = vec![
                (
                    Method::GET,
                    "/counter",
                    "acme.localhost".into(),
                    Some(format!("id={long}")),
                    None,
                ),
                (
                    Method::GET,
                    "/me",
                    "acme.localhost".into(),
                    Some("id=%%%;id=;;=".into()),
                    None,
                ),
                (Method::GET, "/", "-bad-.localhost".into(), None, None),
                (Method::GET, "/", "a..b".into(), None, None),
                (
                    Method::POST,
                    "/login",
                    "acme.localhost".into(),
                    None,
                    Some("user="),
                ),
                (
                    Method::POST,
                    "/login",
                    "acme.localhost".into(),
                    None,
                    Some("\u{0}\u{1}"),
                ),
                (
                    Method::POST,
                    "/counter",
                    "acme.localhost".into(),
                    Some("id=AAAAAAAAAAAAAAAAAAAAAA".into()),
                    None,
                ),
            ];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (method, path, host, cookie, form) in &cases {
                    let peer = SocketAddr::from(([192, 0, 2, (sent % 250) as u8 + 1], 40000));
                    let (status, _, _) = request(
                        &app,
                        method.clone(),
                        path,
                        host,
                        peer,
                        cookie.as_deref(),
                        *form,
                    )
                    .await;
                    if status.is_server_error() && errors.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("malformed {method} {path} {host} {cookie:?} {form:?}: {status}");
                    }
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };

    // Two outages: kill, wait, restart (the append-only file brings the data back).
    let phase = Duration::from_millis(seconds * 1000 / 6);
    for _ in 0..2 {
        tokio::time::sleep(phase).await;
        redis.stop();
        tokio::time::sleep(phase).await;
        redis.restart();
    }
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = Vec::new();
    for client in clients {
        seen.push(client.await.expect("no client task panicked"));
    }
    for flooder in flooders {
        flooder.await.expect("no flood task panicked");
    }
    let malformed_sent = malformed.await.expect("the malformed stream did not panic");

    // Journaled writes reach Redis.
    for built in [&one, &two] {
        let store = built.fallback.as_ref().expect("a fallback store on Redis");
        assert_eq!(
            store.flush(Duration::from_secs(10)).await,
            0,
            "the journal drains"
        );
        let status = store.status();
        assert_eq!((status.superseded, status.dropped), (0, 0), "{status:?}");
    }

    let requests: u64 = seen.iter().map(|s| s.requests).sum();
    let server_errors: u64 = seen.iter().map(|s| s.server_errors).sum::<u64>()
        + flood_errors.load(Ordering::Relaxed)
        + malformed_errors.load(Ordering::Relaxed);
    let granted = flood_granted.load(Ordering::Relaxed);
    // Each instance's local fallback grants up to the whole quota while Redis is down (the
    // default `Fallback::Local` share of 1.0), on top of what Redis counted; and a sliding
    // window lets up to the quota through in any window-long span, so a run that crosses a
    // window boundary sees the previous window's weight fade by the share of the window run.
    let allowance = (LIMIT * (1 + 2)) as f64 * (1.0 + (seconds + 1) as f64 / 60.0);
    let allowance = allowance.ceil() as u64;
    let restarted = seen.iter().map(|s| s.restarted).sum::<u64>();
    eprintln!(
        "fault drill ({seconds} s, 2 outages): {requests} client requests, {malformed_sent} \
         malformed, {server_errors} server errors; {restarted} client sessions restarted while \
         the serving instance held no copy; flood granted {granted} (limit {LIMIT}, allowance \
         {allowance})"
    );
    assert_eq!(server_errors, 0, "no 5xx");
    assert!(granted >= LIMIT, "the flood got its quota: {granted}");
    assert!(
        granted <= allowance,
        "{granted} over the allowance {allowance}"
    );

    // Every acknowledged write is in Redis: a fresh instance reads each client's counter.
    let fresh = build_parts(&config).await.unwrap().router;
    let mut verified = 0;
    for client in &seen {
        let Some(expected) = client.last_counter else {
            continue;
        };
        let peer = SocketAddr::from(([198, 51, 100, 200], 40000));
        let (status, body, _) = request(
            &fresh,
            Method::GET,
            "/counter",
            &client.host,
            peer,
            client.cookie.as_deref(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.trim(), expected.to_string(), "{client:?}");
        verified += 1;
    }
    eprintln!("  {verified} clients' last acknowledged writes read back from Redis");
    assert_eq!(verified, seen.len(), "every client wrote");
}
