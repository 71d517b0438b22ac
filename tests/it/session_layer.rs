//! The session layer end to end: an axum router, real stores, requests with cookies.

use std::{sync::Arc, time::Duration};

use axum::{Router, http::StatusCode};
use http::{HeaderValue, header};
use tower_turnstile::{
    backend::RedisBackend,
    session::{
        FailurePolicy, FallbackStore, MemoryStore, RedisStore, SessionLayer, SessionStore,
        SigningKey,
    },
};

use crate::support::{
    RedisServer,
    http::{Client, send},
    session_app::{app, event, max_age},
};

fn memory_layer() -> SessionLayer {
    SessionLayer::new(MemoryStore::new())
}

fn redis_store(server: &RedisServer) -> RedisStore {
    RedisStore::new(RedisBackend::new(&server.url()).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Behaviour that must hold on every store.

async fn cookie_attributes_and_no_cookie_for_empty_sessions(layer: SessionLayer) {
    let mut c = Client::new(app(layer));
    let reply = c.get("/get/a").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "none")
    );
    assert!(
        reply.set_cookie().is_none(),
        "reading an empty session sets no cookie"
    );

    let reply = c.post("/remove/a").await;
    assert!(
        reply.set_cookie().is_none(),
        "a session left empty sets no cookie"
    );

    let reply = c.post("/set/a/1").await;
    let cookie = reply.set_cookie().expect("the first write sets the cookie");
    for attribute in ["id=", "HttpOnly", "SameSite=Lax", "Secure", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(
        !cookie.contains("Max-Age") && !cookie.contains("Expires"),
        "a browser-session cookie by default: {cookie}"
    );
    assert_eq!(
        reply.headers.get(header::CACHE_CONTROL).unwrap(),
        "no-store"
    );

    let reply = c.get("/get/a").await;
    assert_eq!(reply.body, "\"1\"");
    assert!(
        reply.set_cookie().is_none(),
        "a known session is not re-sent"
    );
    let reply = c.post("/set/b/2").await;
    assert!(reply.set_cookie().is_none(), "an update keeps the cookie");
}

async fn destroy_sends_a_removal_cookie(layer: SessionLayer) {
    let mut c = Client::new(app(layer));
    c.post("/set/a/1").await;
    let old = c.cookie.clone().unwrap();
    let reply = c.post("/destroy").await;
    let removal = reply.set_cookie().expect("removal cookie");
    assert!(removal.contains("Max-Age=0"), "{removal}");
    assert!(c.cookie.is_none());
    c.cookie = Some(old);
    assert_eq!(c.get("/get/a").await.body, "none", "the old cookie is dead");
}

async fn login_cycles_the_id_and_keeps_the_data(layer: SessionLayer) {
    let mut c = Client::new(app(layer));
    c.post("/bump/n").await;
    let before = c.cookie.clone().unwrap();
    let reply = c.post("/login/alice").await;
    let after = c.cookie.clone().unwrap();
    assert!(reply.set_cookie().is_some());
    assert_ne!(before, after, "login gives the session a new id");
    assert_eq!(c.get("/user").await.body, "alice");
    assert_eq!(
        c.post("/bump/n").await.body,
        "2",
        "the data moved with the session"
    );

    let mut old = Client::new(c.app());
    old.cookie = Some(before);
    assert_eq!(
        old.get("/user").await.body,
        "anonymous",
        "the old id is dead"
    );
    assert_eq!(old.get("/get/n").await.body, "none");

    // cycle_id alone: new id, same data, same user.
    let reply = c.post("/cycle").await;
    assert!(reply.set_cookie().is_some());
    assert_ne!(c.cookie.clone().unwrap(), after);
    assert_eq!(c.get("/user").await.body, "alice");
    assert_eq!(c.get("/get/n").await.body, "2");
}

async fn concurrent_requests_changing_different_keys(layer: SessionLayer) {
    let mut c = Client::new(app(layer));
    c.post("/set/base/0").await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let reply = c.post(&format!("/set/k{i}/{i}")).await;
                assert_eq!(reply.status, StatusCode::OK);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for i in 0..64 {
        assert_eq!(
            c.get(&format!("/get/k{i}")).await.body,
            format!("\"{i}\""),
            "write k{i} was lost"
        );
    }
}

async fn user_sessions_are_listed_and_revoked(layer: SessionLayer) {
    let app = app(layer);
    let mut jars: Vec<Client> = (0..3).map(|_| Client::new(app.clone())).collect();
    for jar in &mut jars {
        jar.post("/set/x/1").await;
        jar.post("/login/alice").await;
    }
    let mut carol = Client::new(app.clone());
    carol.post("/login/carol").await;
    assert_eq!(jars[0].get("/sessions").await.body, "3");
    assert_eq!(jars[1].post("/logout-all").await.body, "3");
    for jar in &mut jars {
        assert_eq!(jar.get("/user").await.body, "anonymous");
    }
    assert_eq!(carol.get("/user").await.body, "carol");
    assert_eq!(carol.get("/sessions").await.body, "1");
}

async fn no_save_after_a_server_error_unless_asked(layer: SessionLayer) {
    let mut c = Client::new(app(layer.clone()));
    let reply = c.post("/fail/a/1").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(reply.set_cookie().is_none(), "nothing is saved after a 5xx");

    let mut c = Client::new(app(layer.with_failure_policy(
        FailurePolicy::fail_open().with_save_on_server_error(true),
    )));
    let reply = c.post("/fail/a/1").await;
    assert!(reply.set_cookie().is_some());
    assert_eq!(c.get("/get/a").await.body, "\"1\"");
}

async fn a_cookie_replayed_on_another_tenant_finds_nothing(layer: SessionLayer) {
    let app = app(layer);
    let tenant_request = |path: &str, tenant: &str, cookie: Option<&String>| {
        let mut request = http::Request::builder()
            .method("GET")
            .uri(path)
            .header("x-tenant", tenant);
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        request.body(axum::body::Body::empty()).unwrap()
    };
    let post = |path: &str, tenant: &str, cookie: Option<&String>| {
        let mut request = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("x-tenant", tenant);
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        request.body(axum::body::Body::empty()).unwrap()
    };
    let reply = send(&app, post("/set/secret/42", "acme", None)).await;
    let cookie = reply
        .set_cookie()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let reply = send(&app, post("/login/alice", "acme", Some(&cookie))).await;
    let cookie = reply
        .set_cookie()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        send(&app, tenant_request("/user", "acme", Some(&cookie)))
            .await
            .body,
        "alice"
    );

    assert_eq!(
        send(&app, tenant_request("/get/secret", "globex", Some(&cookie)))
            .await
            .body,
        "none"
    );
    assert_eq!(
        send(&app, tenant_request("/user", "globex", Some(&cookie)))
            .await
            .body,
        "anonymous"
    );
    assert_eq!(
        send(&app, tenant_request("/sessions", "globex", Some(&cookie)))
            .await
            .body,
        "0"
    );
    // A write there starts a separate globex session and leaves acme's alone.
    let reply = send(&app, post("/set/secret/evil", "globex", Some(&cookie))).await;
    assert!(reply.set_cookie().is_some());
    assert_eq!(
        send(&app, tenant_request("/get/secret", "acme", Some(&cookie)))
            .await
            .body,
        "\"42\""
    );
}

async fn malformed_cookies_are_no_session_and_never_5xx(layer: SessionLayer) {
    let app = app(layer);
    let mut good = Client::new(app.clone());
    good.post("/set/a/1").await;
    let valid = good.cookie.clone().unwrap();
    let long = format!("id={}", "A".repeat(8000));
    let cases: Vec<HeaderValue> = vec![
        HeaderValue::from_static("id="),
        HeaderValue::from_static("id=not-a-session-id"),
        HeaderValue::from_static("id=AAAAAAAAAAAAAAAAAAAAAA"),
        HeaderValue::from_static(";;;=;=;id;;"),
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_bytes(b"id=\xff\xfe\x80abc").unwrap(),
        HeaderValue::from_static("id=\"quoted\""),
    ];
    for cookie in cases {
        for (method, path) in [
            ("GET", "/get/a"),
            ("POST", "/bump/n"),
            ("POST", "/login/x"),
            ("POST", "/destroy"),
        ] {
            let request = http::Request::builder()
                .method(method)
                .uri(path)
                .header(header::COOKIE, cookie.clone())
                .body(axum::body::Body::empty())
                .unwrap();
            let reply = send(&app, request).await;
            assert_eq!(reply.status, StatusCode::OK, "{cookie:?} {method} {path}");
            if path == "/get/a" {
                assert_eq!(reply.body, "none");
            }
        }
    }
    // Duplicated cookies: the first valid one wins, invalid ones before it are skipped.
    let dup = format!("id=garbage; {valid}; id=AAAAAAAAAAAAAAAAAAAAAA");
    let request = http::Request::get("/get/a")
        .header(header::COOKIE, dup)
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(send(&app, request).await.body, "\"1\"");
}

/// A write whose cookie names a session that is gone starts a new session holding exactly that
/// write: never the old data, never the old user, and the old id stays dead.
async fn blind_writes_to_a_gone_session_start_a_new_one(layer: SessionLayer) {
    async fn blind_write_restarts(c: &mut Client, gone: &str) {
        let reply = c.post("/set/a/1").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(event(&reply), Some("Restarted"), "{gone}");
        let cookies = reply.set_cookies();
        assert_eq!(
            cookies.len(),
            1,
            "{gone}: one new cookie, no removal: {cookies:?}"
        );
        assert!(!cookies[0].contains("Max-Age=0"), "{gone}: {cookies:?}");
        assert_eq!(
            c.get("/get/a").await.body,
            "\"1\"",
            "{gone}: the write is kept"
        );
        assert_eq!(c.get("/get/x").await.body, "none", "{gone}: no old data");
        assert_eq!(
            c.get("/user").await.body,
            "anonymous",
            "{gone}: no old user"
        );
    }

    // Unknown: a well-formed id that names no session.
    let unknown = "id=AAAAAAAAAAAAAAAAAAAAAA".to_owned();
    let mut c = Client::new(app(layer.clone()));
    c.cookie = Some(unknown.clone());
    blind_write_restarts(&mut c, "unknown").await;
    assert_ne!(c.cookie.as_deref(), Some(unknown.as_str()), "a fresh id");

    // Destroyed elsewhere: "log out everywhere" from another client of the same user.
    let mut c = Client::new(app(layer.clone()));
    c.post("/set/x/old").await;
    c.post("/login/alice").await;
    let old = c.cookie.clone().unwrap();
    let mut other = Client::new(c.app());
    other.post("/login/alice").await;
    assert_eq!(other.post("/logout-all").await.body, "2");
    blind_write_restarts(&mut c, "destroyed").await;
    assert_ne!(c.cookie.as_deref(), Some(old.as_str()));
    let mut stale = Client::new(c.app());
    stale.cookie = Some(old);
    assert_eq!(
        stale.get("/get/a").await.body,
        "none",
        "the old id stays dead"
    );
    assert_eq!(stale.get("/user").await.body, "anonymous");

    // Expired: unused past its inactivity timeout.
    let short = layer.with_inactivity_timeout(Duration::from_millis(400));
    let mut c = Client::new(app(short));
    c.post("/set/x/old").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    blind_write_restarts(&mut c, "expired").await;

    // A blind removal from a gone session leaves nothing to store: the cookie is cleared.
    let mut c = Client::new(c.app());
    c.cookie = Some(unknown);
    let reply = c.post("/remove/a").await;
    assert!(reply.set_cookie().unwrap().contains("Max-Age=0"));
    assert_eq!(event(&reply), None);
}

async fn is_new_tells_a_new_visitor_from_a_returning_one(layer: SessionLayer) {
    let mut c = Client::new(app(layer));
    assert_eq!(c.get("/is-new").await.body, "true", "no cookie");
    let reply = c.post("/set/a/1").await;
    assert_eq!(event(&reply), Some("Created"));
    assert_eq!(c.get("/is-new").await.body, "false");
    assert_eq!(event(&c.post("/set/a/2").await), Some("Saved"));
    c.cookie = Some("id=AAAAAAAAAAAAAAAAAAAAAA".into());
    assert_eq!(
        c.get("/is-new").await.body,
        "true",
        "a cookie of no live session"
    );
}

/// One live session switched persistent → browser-session → persistent: each answer carries the
/// matching cookie, only when it changes, and another instance applies what was stored.
async fn expiry_switches_on_a_live_session(layer: SessionLayer) {
    let (one, two) = (app(layer.clone()), app(layer));
    let mut c = Client::new(one);
    let first = c.post("/set/a/1").await;
    let set = first.set_cookie().unwrap();
    assert_eq!(max_age(&set), None, "browser-session by default: {set}");
    let id = c.cookie.clone().unwrap();

    for round in 0..2 {
        let reply = c.post("/login-remember/alice").await;
        let set = reply.set_cookie().expect("a login sets a new cookie");
        assert!(max_age(&set).unwrap() > 6 * 24 * 3600, "{round}: {set}");
        let reply = c
            .post(&format!("/expiry/idle/{}", 7 * 24 * 3600 * 1000))
            .await;
        assert!(
            reply.set_cookie().is_none(),
            "{round}: unchanged: not re-sent"
        );
        // Another instance reads the stored kind: its id change re-sends a persistent cookie.
        let mut there = c.on(two.clone());
        let set = there.post("/cycle").await.set_cookie().unwrap();
        assert!(
            max_age(&set).is_some(),
            "{round}: persistent on the other instance: {set}"
        );
        c.cookie = there.cookie.clone();

        let reply = c.post("/expiry/browser").await;
        assert_eq!(event(&reply), Some("Saved"));
        let set = reply.set_cookie().expect("re-sent when the kind changes");
        assert_eq!(max_age(&set), None, "{round}: browser-session: {set}");
        assert!(!set.contains("Expires"), "{set}");
        assert_eq!(c.cookie, there.cookie, "{round}: same id, new attributes");
        assert!(c.post("/expiry/browser").await.set_cookie().is_none());
        let mut there = c.on(two.clone());
        let set = there.post("/cycle").await.set_cookie().unwrap();
        assert_eq!(
            max_age(&set),
            None,
            "{round}: browser-session there too: {set}"
        );
        c.cookie = there.cookie.clone();

        let reply = c.post("/expiry/idle/3600000").await;
        let set = reply.set_cookie().expect("re-sent when the kind changes");
        assert!(max_age(&set).is_some(), "{round}: persistent again: {set}");
    }
    assert_ne!(c.cookie.unwrap(), id);
    let mut c = Client::new(two);
    assert_eq!(c.get("/get/a").await.body, "none");
}

/// The chosen expiry is enforced by the store, not only by the cookie.
async fn chosen_expiry_is_enforced(layer: SessionLayer) {
    let app = app(layer);
    // An end time: the session ends then, however active.
    let mut c = Client::new(app.clone());
    c.post("/set/a/1").await;
    let set = c.post("/expiry/at/1500").await.set_cookie().unwrap();
    assert!(matches!(max_age(&set), Some(1..=2)), "{set}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(c.get("/get/a").await.body, "\"1\"");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(c.get("/get/a").await.body, "none", "ended at its time");

    // A short inactivity timeout of its own, while the layer's is a day.
    let mut c = Client::new(app.clone());
    c.post("/set/a/1").await;
    c.post("/expiry/idle/1500").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(c.get("/get/a").await.body, "\"1\"", "each use restarts it");
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        c.get("/get/a").await.body,
        "none",
        "unused past its own timeout"
    );

    // A time already past ends the session at once.
    let mut c = Client::new(app);
    c.post("/set/a/1").await;
    let reply = c.post("/expiry/ended").await;
    assert!(reply.set_cookie().unwrap().contains("Max-Age=0"));
    assert_eq!(event(&reply), Some("Destroyed"));
}

macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::memory_layer().with_secure(true)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(server) = super::RedisServer::start() else { return };
                    super::$test(super::SessionLayer::new(super::redis_store(&server))).await;
                }
            )*
        }
        mod fallback {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(server) = super::RedisServer::start() else { return };
                    let store = super::FallbackStore::new(super::redis_store(&server));
                    super::$test(super::SessionLayer::new(store)).await;
                }
            )*
        }
    };
}

on_every_store!(
    cookie_attributes_and_no_cookie_for_empty_sessions,
    destroy_sends_a_removal_cookie,
    login_cycles_the_id_and_keeps_the_data,
    concurrent_requests_changing_different_keys,
    user_sessions_are_listed_and_revoked,
    no_save_after_a_server_error_unless_asked,
    a_cookie_replayed_on_another_tenant_finds_nothing,
    malformed_cookies_are_no_session_and_never_5xx,
    blind_writes_to_a_gone_session_start_a_new_one,
    is_new_tells_a_new_visitor_from_a_returning_one,
    expiry_switches_on_a_live_session,
    chosen_expiry_is_enforced,
);

// ---------------------------------------------------------------------------------------------
// Redis specifics: round trips, instances, signing, corruption, outages.

/// A Redis-backed app plus its backend, for counting round trips.
fn redis_app(server: &RedisServer) -> (Router, RedisBackend) {
    let backend = RedisBackend::new(&server.url()).unwrap();
    (
        app(SessionLayer::new(RedisStore::new(backend.clone()))),
        backend,
    )
}

/// The same with the store's local copy on.
fn redis_copy_app(server: &RedisServer) -> (Router, RedisBackend) {
    let backend = RedisBackend::new(&server.url()).unwrap();
    let store =
        RedisStore::new(backend.clone()).with_local_copy(RedisStore::SUGGESTED_COPY_CAPACITY);
    (app(SessionLayer::new(store)), backend)
}

/// The same on a fallback store in front of Redis.
fn fallback_app(server: &RedisServer) -> (Router, RedisBackend) {
    let backend = RedisBackend::new(&server.url()).unwrap();
    let store = FallbackStore::new(RedisStore::new(backend.clone()));
    (app(SessionLayer::new(store)), backend)
}

/// Runs one request and returns (client commands seen by MONITOR, round trips counted).
async fn measure(
    c: &mut Client,
    method: &str,
    path: &str,
    monitor: &crate::support::Monitor,
    backend: &RedisBackend,
) -> (Vec<String>, u64) {
    monitor.take();
    let before = backend.status().round_trips;
    let reply = c.send(method, path).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{method} {path}: {}",
        reply.body
    );
    let after = backend.status().round_trips;
    (monitor.take(), after - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_round_trips_per_request() {
    round_trips_per_request(redis_app, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_round_trips_per_request_with_a_local_copy() {
    round_trips_per_request(redis_copy_app, true).await;
}

/// While Redis answers, the fallback store sends exactly what the Redis store sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_round_trips_per_request_are_redis_ones() {
    round_trips_per_request(fallback_app, false).await;
}

async fn round_trips_per_request(make: fn(&RedisServer) -> (Router, RedisBackend), copy: bool) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (app, backend) = make(&server);
    // Warm up: connect and load the scripts, so only steady-state traffic is counted.
    let mut warm = Client::new(app.clone());
    warm.post("/bump/n").await;
    warm.post("/bump/n").await;
    let monitor = server.monitor();

    let mut c = Client::new(app);
    // Round trips without a local copy, and with one (where the first read leaves the instance
    // a copy, the next are served from it, and writes update it in place).
    let cases = [
        ("untouched, no cookie", "GET", "/untouched", 0, 0),
        ("new session", "POST", "/set/a/1", 1, 1),
        ("untouched, with cookie", "GET", "/untouched", 0, 0),
        // Held since its creation: the creation read its TTL on a tracking connection.
        ("read only", "GET", "/get/a", 1, 0),
        ("read again, held", "GET", "/get/a", 1, 0),
        ("write without read", "POST", "/set/b/2", 1, 1),
        ("read then write, held", "POST", "/bump/n", 2, 1),
        ("login", "POST", "/login/alice", 2, 1),
        ("read after login, a new id", "GET", "/user", 1, 0),
        (
            "expiry unchanged (read to compare)",
            "POST",
            "/expiry/browser",
            1,
            0,
        ),
        ("expiry change", "POST", "/expiry/idle/60000", 2, 1),
        ("login with expiry", "POST", "/login-remember/alice", 2, 1),
    ];
    for (name, method, path, without_copy, with_copy) in cases {
        let expected = if copy { with_copy } else { without_copy };
        let (commands, round_trips) = measure(&mut c, method, path, &monitor, &backend).await;
        eprintln!(
            "round trips: {name:<24} {round_trips} ({} commands: {commands:?})",
            commands.len()
        );
        assert_eq!(round_trips, expected, "{name}: {commands:?}");
        let pipelined = commands.len() as u64;
        assert!(
            pipelined >= round_trips,
            "{name}: MONITOR saw fewer commands than round trips"
        );
        if expected == 0 {
            assert!(commands.is_empty(), "{name}: {commands:?}");
        }
        // Native commands only: a script costs Redis several times what it sequences.
        assert!(
            !commands.iter().any(|cmd| cmd.starts_with("EVAL")),
            "{name}: {commands:?}"
        );
        let names: Vec<&str> = commands
            .iter()
            .map(|cmd| cmd.split(' ').next().unwrap())
            .collect();
        if name == "read only" && !copy {
            // Nothing written: the inactivity expiry was restarted when the session was made.
            assert_eq!(names, ["TIME", "HGETALL", "PTTL"], "{name}: {commands:?}");
        }
        if copy && name.ends_with("held") {
            // A save with a current copy reads nothing first.
            assert!(
                names.len() <= 6 && !names.contains(&"HGETALL"),
                "{name}: {commands:?}"
            );
        }
    }

    // A blind write to a gone session: the update reports it gone, the create follows.
    c.cookie = Some("id=AAAAAAAAAAAAAAAAAAAAAA".into());
    let (commands, round_trips) = measure(&mut c, "POST", "/set/z/1", &monitor, &backend).await;
    eprintln!("round trips: blind write, gone session {round_trips} ({commands:?})");
    assert_eq!(round_trips, 2, "{commands:?}");
    assert!(
        !commands.iter().any(|cmd| cmd.starts_with("EVAL")),
        "{commands:?}"
    );

    // The login wrote the new record before it removed the old one, in one pipeline.
    c.post("/set/c/3").await;
    monitor.take();
    c.post("/cycle").await;
    let commands = monitor.take();
    let create = commands
        .iter()
        .position(|cmd| cmd.starts_with("HSET "))
        .expect("create");
    let delete = commands
        .iter()
        .position(|cmd| cmd.starts_with("DEL "))
        .expect("delete");
    assert!(create < delete, "new record first: {commands:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_instances_share_sessions_and_revocation() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // Two instances: separate backends (connections, breakers), one Redis.
    let (a, _) = redis_app(&server);
    let (b, _) = redis_app(&server);
    let mut jars = vec![
        Client::new(a.clone()),
        Client::new(a.clone()),
        Client::new(b.clone()),
    ];
    for jar in &mut jars {
        jar.post("/bump/n").await;
        jar.post("/login/alice").await;
    }
    // A cookie from one instance works on the other.
    let mut moved = jars[0].on(b.clone());
    assert_eq!(moved.get("/user").await.body, "alice");
    assert_eq!(moved.post("/bump/n").await.body, "2");
    assert_eq!(jars[0].get("/get/n").await.body, "2");

    assert_eq!(moved.get("/sessions").await.body, "3");
    assert_eq!(jars[2].post("/logout-all").await.body, "3");
    for jar in &mut jars {
        assert_eq!(jar.get("/user").await.body, "anonymous");
        assert_eq!(jar.on(b.clone()).get("/user").await.body, "anonymous");
    }
}

/// Two instances on separate connections: a session ended on one ("log out everywhere"), then
/// written blind on the other, comes back as a new session that holds only the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blind_write_after_logout_elsewhere_starts_a_new_session() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, _) = redis_app(&server);
    let (b, _) = redis_app(&server);
    let mut on_a = Client::new(a.clone());
    on_a.post("/set/cart/old").await;
    on_a.post("/login/alice").await;
    let old = on_a.cookie.clone().unwrap();
    let mut on_b = on_a.on(b.clone());
    assert_eq!(on_b.post("/logout-all").await.body, "1");

    let reply = on_a.post("/set/a/1").await;
    assert_eq!(event(&reply), Some("Restarted"));
    let new = on_a.cookie.clone().unwrap();
    assert_ne!(new, old);
    let mut new_on_b = on_a.on(b.clone());
    assert_eq!(new_on_b.get("/get/a").await.body, "\"1\"");
    assert_eq!(new_on_b.get("/get/cart").await.body, "none");
    assert_eq!(new_on_b.get("/user").await.body, "anonymous");
    let mut stale = Client::new(b);
    stale.cookie = Some(old);
    assert_eq!(
        stale.get("/get/cart").await.body,
        "none",
        "the old id stays dead"
    );
    // Nothing under alice came back: her index lists no session.
    let mut alice = Client::new(a);
    alice.post("/login/alice").await;
    assert_eq!(alice.get("/sessions").await.body, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_signed_cookies_refuse_forgeries_without_a_round_trip() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let key = SigningKey::from_secret("shared secret of every instance").unwrap();
    let app = app(SessionLayer::new(RedisStore::new(backend.clone())).with_signing_key(key));
    let mut c = Client::new(app.clone());
    c.post("/set/a/1").await;
    assert_eq!(c.get("/get/a").await.body, "\"1\"");
    let monitor = server.monitor();

    let genuine = c.cookie.clone().unwrap();
    let (name, value) = genuine.split_once('=').unwrap();
    let unsigned_tail = &value[value.len() - 22..];
    let mut flipped = value.as_bytes().to_vec();
    flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
    let forgeries = [
        format!("{name}={}", String::from_utf8(flipped).unwrap()),
        format!("{name}={unsigned_tail}"),
        format!("{name}={}x", value),
    ];
    for forged in forgeries {
        let mut f = Client::new(app.clone());
        f.cookie = Some(forged.clone());
        let (commands, round_trips) = measure(&mut f, "GET", "/get/a", &monitor, &backend).await;
        assert_eq!(
            (commands.len(), round_trips),
            (0, 0),
            "{forged}: {commands:?}"
        );
        assert_eq!(f.get("/get/a").await.body, "none");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_signing_keys_rotate() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store: Arc<dyn SessionStore> = Arc::new(redis_store(&server));
    let old = SigningKey::from_secret("old secret").unwrap();
    let new = SigningKey::from_secret("new secret").unwrap();
    let before =
        app(SessionLayer::from_shared_store(Arc::clone(&store)).with_signing_key(old.clone()));
    let rotated = app(SessionLayer::from_shared_store(Arc::clone(&store))
        .with_signing_key(new.clone())
        .with_previous_signing_key(old));
    let after = app(SessionLayer::from_shared_store(store).with_signing_key(new));

    let mut c = Client::new(before);
    c.post("/set/a/1").await;
    let old_cookie = c.cookie.clone().unwrap();
    let mut c = c.on(rotated);
    assert_eq!(
        c.get("/get/a").await.body,
        "\"1\"",
        "cookies signed with the previous key still work"
    );
    c.post("/cycle").await;
    let new_cookie = c.cookie.clone().unwrap();
    let mut c = c.on(after);
    assert_eq!(
        c.get("/get/a").await.body,
        "\"1\"",
        "a cycled cookie is signed with the current key"
    );
    c.cookie = Some(old_cookie);
    assert_eq!(
        c.get("/get/a").await.body,
        "none",
        "once retired, the old key is refused"
    );
    assert_ne!(new_cookie, c.cookie.clone().unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_corrupted_records_are_no_session() {
    corrupted_records_are_no_session(redis_app).await;
}

/// Through the fallback store too: a corrupted record reads as none, and is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_corrupted_records_are_no_session() {
    corrupted_records_are_no_session(fallback_app).await;
}

async fn corrupted_records_are_no_session(make: fn(&RedisServer) -> (Router, RedisBackend)) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (app, _) = make(&server);
    let corruptions: [&[&str]; 5] = [
        &["SET", "{key}", "not a hash"],
        &["HSET", "{key}", "d:n", "{not json"],
        &["HDEL", "{key}", "m:abs"],
        &["HSET", "{key}", "m:idle", "soon"],
        &["HSET", "{key}", "d:n", "\u{ff}"],
    ];
    for corruption in corruptions {
        let mut c = Client::new(app.clone());
        c.post("/bump/n").await;
        let keys = server.cli(&["--scan", "--pattern", "turnstile:default:session:*"]);
        let key = keys.lines().next().expect("one session key").to_owned();
        if corruption[0] == "SET" {
            server.cli(&["DEL", &key]);
        }
        let args: Vec<&str> = corruption
            .iter()
            .map(|a| if *a == "{key}" { key.as_str() } else { a })
            .collect();
        server.cli(&args);

        let reply = c.get("/get/n").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "none"),
            "{corruption:?}"
        );
        assert_eq!(
            server.cli(&["EXISTS", &key]).trim(),
            "0",
            "{corruption:?}: the corrupted record is removed"
        );
        let reply = c.post("/bump/n").await;
        assert_eq!(reply.body, "1");
        assert!(
            reply.set_cookie().is_some(),
            "{corruption:?}: a fresh session replaces it"
        );
        server.cli(&["FLUSHALL"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_holds_a_usable_session_id() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (app, _) = redis_app(&server);
    let mut c = Client::new(app);
    c.post("/set/a/1").await;
    c.post("/login/alice").await;
    let id = c
        .cookie
        .clone()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    let dump = server.cli(&["--scan"]);
    assert!(!dump.contains(&id), "keys hold the id: {dump}");
    for key in dump.lines() {
        let content = server.cli(&["DUMP", key]);
        assert!(!content.contains(&id), "{key} holds the id");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_then_recovers() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let layer = SessionLayer::new(RedisStore::new(backend.clone()));
    let open = app(layer.clone());
    let closed = app(layer.with_failure_policy(FailurePolicy::fail_closed()));
    let mut c = Client::new(open.clone());
    c.post("/set/a/1").await;
    let cookie = c.cookie.clone();

    server.stop();
    // Fail-open (the default): every request still answers, with an empty session.
    let reply = c.get("/get/a").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "none")
    );
    let reply = c.post("/bump/n").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.set_cookie().is_none(),
        "a failed save neither sets nor clears the cookie"
    );
    assert_eq!(c.cookie, cookie);
    let mut fresh = Client::new(open.clone());
    let reply = fresh.post("/set/a/1").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.set_cookie().is_none(),
        "no cookie for a session that could not be stored"
    );
    assert!(!backend.status().healthy, "the breaker opened");

    // Fail-closed: 503 with a plain reason, never the handler's answer.
    let mut strict = c.on(closed.clone());
    let reply = strict.get("/get/a").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.body.contains("session store unavailable"));
    // Untouched sessions need no store, so fail-closed routes that ignore them still answer.
    assert_eq!(strict.get("/untouched").await.status, StatusCode::OK);

    server.restart();
    // The breaker probes again after it has been open for a while; wait for it to close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !backend.check().await.healthy {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The restarted Redis is empty (it keeps nothing on disk): the old cookie finds nothing,
    // and new sessions work again without any restart of the app.
    let mut c = Client::new(open);
    let reply = c.post("/bump/n").await;
    assert_eq!(reply.body, "1");
    assert!(reply.set_cookie().is_some());
    assert_eq!(c.post("/bump/n").await.body, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stall_is_cut_by_the_deadline() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let store = RedisStore::new(backend.clone()).with_timeout(Duration::from_millis(100));
    let app = app(SessionLayer::new(store));
    let mut c = Client::new(app);
    c.post("/set/a/1").await;
    server.pause();
    // A frozen Redis accepts nothing and answers nothing; each request must still finish
    // (the guard below only catches a hang, it is not a performance assertion).
    for _ in 0..5 {
        let reply = tokio::time::timeout(Duration::from_secs(10), c.get("/get/a"))
            .await
            .expect("request hung");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "none")
        );
    }
    let snapshot = backend.status();
    assert!(!snapshot.healthy);
    assert!(
        snapshot.rejected > 0,
        "once open, the breaker answers without waiting: {snapshot:?}"
    );
    server.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_is_bounded_under_a_flood() {
    let store = MemoryStore::builder().max_sessions(100).build();
    let app = app(SessionLayer::new(store.clone()));
    for i in 0..3000 {
        let mut c = Client::new(app.clone());
        c.post(&format!("/set/k/{i}")).await;
    }
    assert!(store.len() <= 100, "{} sessions held", store.len());
    assert!(!store.is_empty());
}

/// The TTL a read sends is the usual session's inactivity timeout; a session with its own, or
/// one near its absolute end, still ends up with exactly its own TTL, on Redis's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ttl_is_each_sessions_own() {
    use tower_turnstile::{
        session::{Record, SessionKey},
        tenant::Tenant,
    };
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server).with_key_prefix("ttl:");
    let tenant = Tenant::default();
    let hash = |n: u8| format!("session{n:02}{}", "A".repeat(34));
    let key = |n: u8| SessionKey::from_hash(&tenant, &hash(n)).unwrap();
    let hour = Duration::from_secs(3600);
    let pttl = |n: u8| -> i64 {
        let name = format!("ttl:default:session:{}", hash(n));
        server.cli(&["PTTL", &name]).trim().parse().unwrap()
    };
    // Most sessions: 24 h of inactivity, 30 days of life.
    for n in 0..8 {
        store
            .create(&key(n), &Record::new(24 * hour, 720 * hour))
            .await
            .unwrap();
    }
    // One with its own inactivity timeout of a minute.
    store
        .create(&key(8), &Record::new(Duration::from_secs(60), 720 * hour))
        .await
        .unwrap();
    // One whose absolute end is ten seconds away.
    store
        .create(&key(9), &Record::new(24 * hour, Duration::from_secs(10)))
        .await
        .unwrap();
    for n in 0..10 {
        assert!(store.load(&key(n)).await.unwrap().is_some());
    }
    for n in 0..8 {
        let ttl = pttl(n);
        assert!(ttl > 24 * 3_600_000 - 60_000, "usual session: {ttl} ms");
    }
    let own = pttl(8);
    assert!((50_000..=60_000).contains(&own), "own timeout: {own} ms");
    let capped = pttl(9);
    assert!((1..=10_000).contains(&capped), "absolute end: {capped} ms");
}

/// A save to a session that is gone reports it gone and leaves nothing behind in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_save_to_a_gone_session_leaves_nothing() {
    use tower_turnstile::{
        session::{Patch, SessionKey, Written},
        tenant::Tenant,
    };
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis_store(&server);
    let key = SessionKey::from_hash(&Tenant::default(), &"A".repeat(43)).unwrap();
    let mut patch = Patch::default();
    patch.set.push(("a".into(), "1".into()));
    let name = format!("turnstile:default:session:{}", "A".repeat(43));
    // What the write leaves has a TTL of a millisecond.
    assert_eq!(store.update(&key, &patch).await.unwrap(), Written::Missing);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(server.cli(&["EXISTS", &name]).trim(), "0");
    // A read right after the write finds no session, and removes what the write left.
    assert_eq!(store.update(&key, &patch).await.unwrap(), Written::Missing);
    assert!(store.load(&key).await.unwrap().is_none());
    assert_eq!(server.cli(&["EXISTS", &name]).trim(), "0");
    assert_eq!(server.cli(&["KEYS", "*"]).trim(), "");
}

// ---------------------------------------------------------------------------------------------
// The id in a header instead of a cookie (gRPC metadata, cookie-less clients).

/// One request to `app` carrying `id` in `x-session-id`, if any.
async fn with_id_header(
    app: &Router,
    method: &str,
    uri: &str,
    id: Option<&str>,
) -> crate::support::http::Reply {
    let mut request = http::Request::builder().method(method).uri(uri);
    if let Some(id) = id {
        request = request.header("x-session-id", id);
    }
    send(app, request.body(axum::body::Body::empty()).unwrap()).await
}

fn id_of(reply: &crate::support::http::Reply) -> Option<String> {
    reply
        .headers
        .get("x-session-id")
        .map(|value| value.to_str().unwrap().to_owned())
}

async fn the_id_travels_in_a_header(layer: SessionLayer) {
    let app = app(layer.try_with_id_header("x-session-id").unwrap());
    let reply = with_id_header(&app, "POST", "/set/colour/teal", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.set_cookies().is_empty(), "no cookie at all");
    let id = id_of(&reply).expect("the new id in the response header");
    assert!(!id.is_empty());

    let read = with_id_header(&app, "GET", "/get/colour", Some(&id)).await;
    assert_eq!(read.body, "\"teal\"");
    assert_eq!(id_of(&read), None, "an unchanged id is not sent again");

    // The same id as a cookie means nothing to this layer.
    let mut as_cookie = Client::new(app.clone());
    as_cookie.cookie = Some(format!("id={id}"));
    assert_eq!(as_cookie.get("/get/colour").await.body, "none");
    // Garbage and oversized values are no session, never an error.
    for bad in ["", "garbage", &"x".repeat(10_000)] {
        let reply = with_id_header(&app, "GET", "/get/colour", Some(bad)).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "none")
        );
    }

    // A login hands out a new id; the old one is dead.
    let login = with_id_header(&app, "POST", "/login/alice", Some(&id)).await;
    let new_id = id_of(&login).expect("a new id after login");
    assert_ne!(new_id, id);
    assert_eq!(
        with_id_header(&app, "GET", "/get/colour", Some(&id))
            .await
            .body,
        "none"
    );
    assert_eq!(
        with_id_header(&app, "GET", "/get/colour", Some(&new_id))
            .await
            .body,
        "\"teal\""
    );
    // Ending the session sends an empty id.
    let destroyed = with_id_header(&app, "POST", "/destroy", Some(&new_id)).await;
    assert_eq!(id_of(&destroyed).as_deref(), Some(""));
    assert_eq!(
        with_id_header(&app, "GET", "/get/colour", Some(&new_id))
            .await
            .body,
        "none"
    );
}

#[tokio::test]
async fn memory_the_id_travels_in_a_header() {
    the_id_travels_in_a_header(memory_layer()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_the_id_travels_in_a_header() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    the_id_travels_in_a_header(SessionLayer::new(redis_store(&server))).await;
}

#[tokio::test]
async fn a_signed_id_in_a_header_refuses_forgeries() {
    let key = SigningKey::from_secret("shared secret of every instance").unwrap();
    let layer = memory_layer()
        .with_signing_key(key)
        .try_with_id_header("x-session-id")
        .unwrap();
    let app = app(layer);
    let id = id_of(&with_id_header(&app, "POST", "/set/a/1", None).await).unwrap();
    assert_eq!(
        with_id_header(&app, "GET", "/get/a", Some(&id)).await.body,
        "\"1\""
    );
    let mut flipped = id.clone().into_bytes();
    flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(flipped).unwrap();
    assert_eq!(
        with_id_header(&app, "GET", "/get/a", Some(&forged))
            .await
            .body,
        "none"
    );
}

#[test]
fn id_header_names_are_checked() {
    for bad in [
        "",
        "X-Session",
        "cookie",
        "set-cookie",
        "x session",
        ":path",
    ] {
        assert!(
            memory_layer().try_with_id_header(bad).is_err(),
            "{bad:?} accepted"
        );
    }
    assert!(memory_layer().try_with_id_header("x-session-id").is_ok());
}
