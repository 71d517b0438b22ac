//! The reference app (`examples/axum_app.rs`) against its contract, driven in process.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use async_trait::async_trait;
use axum::{
    Router,
    body::{Body, to_bytes},
    http::{HeaderValue, Method, Request, StatusCode, header},
};
use tower::ServiceExt;
use tower_turnstile::{
    StoreError,
    session::{
        MemoryStore, Patch, Record, SessionInfo, SessionKey, SessionLayer, SessionStore,
        SigningKey, UserKey, Written,
    },
    tenant::Tenant,
};

use crate::axum_app::{Config, HealthSource, StartupError, app, build};
use tower_turnstile::ratelimit::{Policy, Quota, RateLimitLayer};
use tower_turnstile::tenant::{HostSubdomain, TenantLayer, TenantRejected};

const COOKIE_NAME: &str = "id";

/// What the app answered.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    body: String,
    content_type: Option<String>,
    set_cookie: Vec<String>,
    cache_control: Option<String>,
}

impl Reply {
    /// The one `Set-Cookie` of the session cookie, if any.
    fn session_cookie(&self) -> Option<&str> {
        let mut cookies = self
            .set_cookie
            .iter()
            .filter(|c| c.starts_with(&format!("{COOKIE_NAME}=")));
        let cookie = cookies.next().map(String::as_str);
        assert!(
            cookies.next().is_none(),
            "two session cookies set: {:?}",
            self.set_cookie
        );
        cookie
    }

    fn assert(&self, status: StatusCode, body: &str) -> &Self {
        assert_eq!(
            (self.status, self.body.as_str()),
            (status, body),
            "{self:?}"
        );
        self
    }
}

/// Sends one request to `app` with the given host, cookie header and form body.
async fn send(
    app: &Router,
    method: Method,
    path: &str,
    host: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    if form.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let request = request
        .body(Body::from(form.unwrap_or_default().to_owned()))
        .unwrap();
    send_request(app, request).await
}

async fn send_request(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    // In a block of its own, so that nothing borrowing the response is held across the
    // body's await (a request can then run on a spawned task).
    let (content_type, cache_control, set_cookie) = {
        let header_text = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
        };
        let set_cookie = response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        (
            header_text(header::CONTENT_TYPE),
            header_text(header::CACHE_CONTROL),
            set_cookie,
        )
    };
    let status = response.status();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
        content_type,
        set_cookie,
        cache_control,
    }
}

/// One browser: a host and a cookie jar holding the session cookie.
struct Client {
    app: Router,
    host: String,
    cookie: Option<String>,
}

impl Client {
    fn new(app: &Router, host: &str) -> Self {
        Self {
            app: app.clone(),
            host: host.to_owned(),
            cookie: None,
        }
    }

    /// The same jar, sent to another host (a cookie replayed elsewhere).
    fn on_host(&self, host: &str) -> Self {
        Self {
            app: self.app.clone(),
            host: host.to_owned(),
            cookie: self.cookie.clone(),
        }
    }

    /// The same jar on the same host, sent to another instance of the app.
    fn on(&self, app: &Router) -> Self {
        Self {
            app: app.clone(),
            host: self.host.clone(),
            cookie: self.cookie.clone(),
        }
    }

    /// The `name=value` pair the jar sends.
    fn cookie(&self) -> &str {
        self.cookie
            .as_deref()
            .expect("the jar holds a session cookie")
    }

    async fn request(&mut self, method: Method, path: &str, form: Option<&str>) -> Reply {
        let reply = send(
            &self.app,
            method,
            path,
            &self.host,
            self.cookie.as_deref(),
            form,
        )
        .await;
        if let Some(set) = reply.session_cookie() {
            let pair = set.split(';').next().unwrap().trim();
            let removed = set.contains("Max-Age=0") || pair == format!("{COOKIE_NAME}=");
            self.cookie = (!removed).then(|| pair.to_owned());
        }
        reply
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.request(Method::GET, path, None).await
    }

    async fn post(&mut self, path: &str) -> Reply {
        self.request(Method::POST, path, None).await
    }

    async fn login(&mut self, user: &str) -> Reply {
        self.request(Method::POST, "/login", Some(&format!("user={user}")))
            .await
    }
}

/// The app's `/health` report, which always answers `200`.
async fn health(app: &Router) -> serde_json::Value {
    let reply = send(app, Method::GET, "/health", "localhost", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    serde_json::from_str(&reply.body).unwrap()
}

/// A rate limit no test reaches.
fn unlimited() -> RateLimitLayer {
    RateLimitLayer::new(Policy::new("per-ip", Quota::per_second(1_000_000)).unwrap())
}

/// The app as `main` builds it without any environment: in memory, cookies without `Secure`.
async fn memory_app() -> Router {
    build(&Config::default()).await.unwrap()
}

#[tokio::test]
async fn index_lists_the_routes() {
    let app = memory_app().await;
    let reply = send(&app, Method::GET, "/", "localhost", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );
    for route in [
        "/counter",
        "/login",
        "/me",
        "/sessions",
        "/logout",
        "/logout-all",
        "/health",
    ] {
        assert!(
            reply.body.contains(route),
            "{route} missing from {:?}",
            reply.body
        );
    }
    assert!(reply.set_cookie.is_empty());
}

#[tokio::test]
async fn counter_counts_across_requests_with_the_cookie() {
    let app = memory_app().await;
    let mut client = Client::new(&app, "localhost:3000");

    let first = client.post("/counter").await;
    first.assert(StatusCode::OK, "1");
    let set = first
        .session_cookie()
        .expect("the first increment sets the cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set.contains(attribute), "{set} lacks {attribute}");
    }
    assert!(
        !set.contains("Secure"),
        "COOKIE_SECURE defaults to off: {set}"
    );
    let max_age: u64 = set
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age > 0, "{set}");
    assert_eq!(first.cache_control.as_deref(), Some("no-store"));

    let cookie = client.cookie().to_owned();
    let second = client.post("/counter").await;
    second.assert(StatusCode::OK, "2");
    assert!(
        second.set_cookie.is_empty(),
        "an existing session keeps its cookie"
    );
    assert_eq!(client.cookie(), cookie);
    client.post("/counter").await.assert(StatusCode::OK, "3");
    client.get("/counter").await.assert(StatusCode::OK, "3");

    // Another browser has its own counter.
    let mut other = Client::new(&app, "localhost:3000");
    other.post("/counter").await.assert(StatusCode::OK, "1");
    client.get("/counter").await.assert(StatusCode::OK, "3");
}

#[tokio::test]
async fn get_counter_creates_no_session() {
    let app = memory_app().await;

    let reply = send(&app, Method::GET, "/counter", "localhost", None, None).await;
    reply.assert(StatusCode::OK, "0");
    assert!(reply.set_cookie.is_empty(), "{reply:?}");
    assert_eq!(reply.cache_control, None);

    // A well-formed cookie naming no session: still 0, still no cookie set or cleared.
    let stale = format!("{COOKIE_NAME}=AAAAAAAAAAAAAAAAAAAAAA");
    let reply = send(
        &app,
        Method::GET,
        "/counter",
        "localhost",
        Some(&stale),
        None,
    )
    .await;
    reply.assert(StatusCode::OK, "0");
    assert!(reply.set_cookie.is_empty(), "{reply:?}");

    // Reading does not write: a later increment starts from 1.
    let mut client = Client::new(&app, "localhost");
    client.get("/counter").await.assert(StatusCode::OK, "0");
    assert!(client.cookie.is_none());
    client.post("/counter").await.assert(StatusCode::OK, "1");
}

#[tokio::test]
async fn login_cycles_the_cookie_and_keeps_the_data() {
    let app = memory_app().await;
    let mut client = Client::new(&app, "localhost");
    client.post("/counter").await;
    client.post("/counter").await.assert(StatusCode::OK, "2");
    let before = client.cookie().to_owned();

    let reply = client.login("alice").await;
    reply.assert(StatusCode::OK, "alice");
    let set = reply.session_cookie().expect("login sets a new cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/"),
        "{set}"
    );
    assert_ne!(client.cookie(), before, "login must cycle the session id");

    client.get("/counter").await.assert(StatusCode::OK, "2");
    client.get("/me").await.assert(StatusCode::OK, "alice");
    client.post("/counter").await.assert(StatusCode::OK, "3");

    // The pre-login id stopped working.
    let old = send(
        &app,
        Method::GET,
        "/counter",
        "localhost",
        Some(&before),
        None,
    )
    .await;
    old.assert(StatusCode::OK, "0");
    let old = send(&app, Method::GET, "/me", "localhost", Some(&before), None).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);

    // Logging in without any session creates one.
    let mut fresh = Client::new(&app, "localhost");
    let reply = fresh.login("bob%20smith").await;
    reply.assert(StatusCode::OK, "bob smith");
    assert!(reply.session_cookie().is_some());
    fresh.get("/me").await.assert(StatusCode::OK, "bob smith");
    fresh.get("/counter").await.assert(StatusCode::OK, "0");
}

/// `POST /login` with `remember=1` gives a persistent cookie; without it, a browser-session
/// cookie. Switching on one live session re-sends the cookie each time, on either instance.
async fn login_remember_chooses_the_cookie_kind(one: &Router, two: &Router) {
    fn max_age(set: &str) -> Option<u64> {
        set.split("Max-Age=")
            .nth(1)?
            .split(';')
            .next()?
            .parse()
            .ok()
    }
    let mut client = Client::new(one, "localhost");
    client.post("/counter").await.assert(StatusCode::OK, "1");
    for (remember, instance) in [(true, one), (false, two), (true, two), (false, one)] {
        client.app = instance.clone();
        let form = if remember {
            "user=alice&remember=1"
        } else {
            "user=alice"
        };
        let reply = client.request(Method::POST, "/login", Some(form)).await;
        reply.assert(StatusCode::OK, "alice");
        let set = reply.session_cookie().expect("login sets a new cookie");
        if remember {
            assert!(max_age(set).is_some_and(|age| age > 24 * 3600), "{set}");
        } else {
            assert!(
                max_age(set).is_none() && !set.contains("Expires"),
                "browser-session: {set}"
            );
        }
        client.get("/me").await.assert(StatusCode::OK, "alice");
    }
    client.app = two.clone();
    client.get("/counter").await.assert(StatusCode::OK, "1");
    let reply = client
        .request(Method::POST, "/login", Some("user=alice&remember=yes"))
        .await;
    assert!(
        max_age(reply.session_cookie().unwrap()).is_none(),
        "only 1 remembers"
    );
}

#[tokio::test]
async fn login_remember_on_memory() {
    let app = memory_app().await;
    login_remember_chooses_the_cookie_kind(&app, &app).await;
}

#[tokio::test]
async fn login_remember_across_two_redis_instances() {
    let Some(server) = crate::support::RedisServer::start() else {
        return;
    };
    let config = Config {
        redis_url: Some(server.url()),
        ..Config::default()
    };
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    login_remember_chooses_the_cookie_kind(&one, &two).await;
}

#[tokio::test]
async fn me_answers_401_until_login() {
    let app = memory_app().await;
    let mut client = Client::new(&app, "localhost");

    let reply = client.get("/me").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.set_cookie.is_empty());
    client.post("/counter").await;
    assert_eq!(
        client.get("/me").await.status,
        StatusCode::UNAUTHORIZED,
        "a session alone is no login"
    );

    client.login("carol").await.assert(StatusCode::OK, "carol");
    client.get("/me").await.assert(StatusCode::OK, "carol");
    // A second login rebinds the session.
    client.login("dave").await.assert(StatusCode::OK, "dave");
    client.get("/me").await.assert(StatusCode::OK, "dave");
}

#[tokio::test]
async fn login_refuses_missing_empty_and_malformed_forms() {
    let app = memory_app().await;
    let form = |body: &[u8], content_type: Option<&'static str>| {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/login")
            .header(header::HOST, "localhost");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body.to_vec())).unwrap()
    };
    let urlencoded = Some("application/x-www-form-urlencoded");
    let long_user = format!("user={}", "u".repeat(2000));
    let cases: Vec<(&str, Request<Body>)> = vec![
        ("no body, no content type", form(b"", None)),
        ("empty body", form(b"", urlencoded)),
        ("empty user", form(b"user=", urlencoded)),
        ("blank user", form(b"user=%20%20", urlencoded)),
        ("other field", form(b"name=alice", urlencoded)),
        ("duplicated field", form(b"user=alice&user=bob", urlencoded)),
        (
            "json body",
            form(br#"{"user":"alice"}"#, Some("application/json")),
        ),
        ("json as form", form(br#"{"user":"alice"}"#, urlencoded)),
        ("binary", form(b"\xff\xfe\x00user", urlencoded)),
        ("user too long", form(long_user.as_bytes(), urlencoded)),
    ];
    for (case, request) in cases {
        let reply = send_request(&app, request).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{case}: {reply:?}");
        assert!(!reply.body.is_empty(), "{case}: a refusal says why");
        assert!(reply.set_cookie.is_empty(), "{case}: {reply:?}");
    }

    // A refused login leaves an existing session as it was.
    let mut client = Client::new(&app, "localhost");
    client.post("/counter").await;
    let cookie = client.cookie().to_owned();
    assert_eq!(client.login("").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(client.cookie(), cookie);
    client.get("/counter").await.assert(StatusCode::OK, "1");
    assert_eq!(client.get("/me").await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sessions_are_counted_and_logout_all_ends_them() {
    let app = memory_app().await;
    let mut laptop = Client::new(&app, "localhost");
    let mut phone = Client::new(&app, "localhost");
    let mut other_user = Client::new(&app, "localhost");

    assert_eq!(
        laptop.get("/sessions").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        laptop.post("/logout-all").await.status,
        StatusCode::UNAUTHORIZED
    );

    laptop.login("alice").await.assert(StatusCode::OK, "alice");
    laptop.get("/sessions").await.assert(StatusCode::OK, "1");
    phone.post("/counter").await;
    phone.login("alice").await.assert(StatusCode::OK, "alice");
    other_user.login("bob").await.assert(StatusCode::OK, "bob");
    assert_ne!(laptop.cookie(), phone.cookie());

    laptop.get("/sessions").await.assert(StatusCode::OK, "2");
    phone.get("/sessions").await.assert(StatusCode::OK, "2");
    other_user
        .get("/sessions")
        .await
        .assert(StatusCode::OK, "1");

    let reply = laptop.post("/logout-all").await;
    reply.assert(StatusCode::OK, "2");
    assert!(
        reply
            .session_cookie()
            .is_some_and(|c| c.contains("Max-Age=0")),
        "{reply:?}"
    );
    assert!(laptop.cookie.is_none());

    // The phone still sends its cookie, which no longer names a session.
    assert_eq!(phone.get("/me").await.status, StatusCode::UNAUTHORIZED);
    phone.get("/counter").await.assert(StatusCode::OK, "0");
    assert_eq!(
        phone.get("/sessions").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        phone.post("/logout-all").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(laptop.get("/me").await.status, StatusCode::UNAUTHORIZED);

    // Another user is untouched.
    other_user.get("/me").await.assert(StatusCode::OK, "bob");
    other_user
        .get("/sessions")
        .await
        .assert(StatusCode::OK, "1");
}

#[tokio::test]
async fn logout_removes_the_session_and_the_cookie() {
    let app = memory_app().await;
    let mut client = Client::new(&app, "localhost");
    client.post("/counter").await;
    client.login("erin").await;
    let cookie = client.cookie().to_owned();

    let reply = client.post("/logout").await;
    assert_eq!(reply.status, StatusCode::OK);
    let removal = reply.session_cookie().expect("logout clears the cookie");
    assert!(
        removal.contains("Max-Age=0") && removal.contains("Path=/"),
        "{removal}"
    );
    assert!(client.cookie.is_none());

    let replay = send(&app, Method::GET, "/me", "localhost", Some(&cookie), None).await;
    assert_eq!(replay.status, StatusCode::UNAUTHORIZED);
    let replay = send(
        &app,
        Method::GET,
        "/counter",
        "localhost",
        Some(&cookie),
        None,
    )
    .await;
    replay.assert(StatusCode::OK, "0");

    // Logging out with no session answers 200 and has no cookie to clear.
    let reply = send(&app, Method::POST, "/logout", "localhost", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.set_cookie.is_empty(), "{reply:?}");
}

/// What the app's tenant layer decides for a `Host` header given as raw bytes.
fn tenant_of_host(host: &[u8]) -> Result<String, TenantRejected> {
    let layer = TenantLayer::new(HostSubdomain::first_label());
    let mut request = Request::get("/").body(()).unwrap();
    request
        .headers_mut()
        .insert(header::HOST, HeaderValue::from_bytes(host).unwrap());
    layer.resolve(&request).map(|t| t.as_str().to_owned())
}

#[test]
fn tenants_come_from_the_first_label() {
    let tenant = |host: &str| tenant_of_host(host.as_bytes());
    let ok = |name: &str| Ok(name.to_owned());
    assert_eq!(tenant("acme.localhost:3000"), ok("acme"));
    assert_eq!(tenant("ACME.localhost"), ok("acme"));
    assert_eq!(tenant("acme.example.com."), ok("acme"));
    for bare in [
        "",
        "localhost",
        "localhost:3000",
        "localhost.",
        "127.0.0.1",
        "127.0.0.1:3000",
        "[::1]",
        "[::1]:3000",
        "::1",
        "[2001:db8::1]:8080",
    ] {
        assert_eq!(tenant(bare), ok("default"), "{bare:?}");
    }
    for malformed in [
        "localhost:abc",
        "localhost:123456",
        "[::1",
        "[::1]x",
        "[::1]:x",
        "[zz]:3000",
        ":3000",
        "acme..localhost",
        "acme.localhost:3000:1",
    ] {
        assert!(
            matches!(tenant(malformed), Err(TenantRejected::Malformed(_))),
            "{malformed:?}: {:?}",
            tenant(malformed)
        );
    }
    assert!(matches!(
        tenant_of_host(b"\xc3\xa9.localhost"),
        Err(TenantRejected::Malformed(_))
    ));
    let long = format!("{}.localhost", "a".repeat(64));
    for invalid in [
        "bad_label.localhost",
        "-acme.localhost",
        "acme-.localhost",
        "a*b.localhost",
        long.as_str(),
    ] {
        assert!(
            matches!(tenant(invalid), Err(TenantRejected::Invalid { .. })),
            "{invalid:?}: {:?}",
            tenant(invalid)
        );
    }
    // An empty first label is refused one way or the other, never a tenant.
    assert!(tenant(".localhost").is_err());
}

#[tokio::test]
async fn invalid_tenant_hosts_get_400() {
    let app = memory_app().await;
    for host in [
        "bad_label.localhost",
        "-acme.localhost:3000",
        "acme..localhost",
        "localhost:abc",
        "[::1",
        "x*y.localhost",
    ] {
        for (method, path) in [
            (Method::GET, "/counter"),
            (Method::POST, "/counter"),
            (Method::GET, "/"),
        ] {
            let reply = send(&app, method, path, host, None, None).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{host:?} {path}: {reply:?}"
            );
            assert!(reply.body.contains("Host header"), "{reply:?}");
            assert_eq!(
                reply.content_type.as_deref(),
                Some("text/plain; charset=utf-8")
            );
            assert!(reply.set_cookie.is_empty());
        }
    }
    // A Host header that is not text.
    let request = Request::builder()
        .uri("/counter")
        .header(
            header::HOST,
            HeaderValue::from_bytes(b"acme\xff.localhost").unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        send_request(&app, request).await.status,
        StatusCode::BAD_REQUEST
    );
    // No Host at all (and no authority): the default tenant.
    let request = Request::builder()
        .uri("/counter")
        .body(Body::empty())
        .unwrap();
    send_request(&app, request)
        .await
        .assert(StatusCode::OK, "0");
}

#[tokio::test]
async fn a_cookie_replayed_on_another_tenant_finds_nothing() {
    let app = memory_app().await;
    let mut acme = Client::new(&app, "acme.localhost:3000");
    acme.post("/counter").await;
    acme.post("/counter").await.assert(StatusCode::OK, "2");
    acme.login("alice").await;

    let mut globex = acme.on_host("globex.localhost:3000");
    let reply = globex.get("/counter").await;
    reply.assert(StatusCode::OK, "0");
    assert!(reply.set_cookie.is_empty());
    assert_eq!(globex.get("/me").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        globex.get("/sessions").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        globex.post("/logout-all").await.status,
        StatusCode::UNAUTHORIZED
    );
    let mut bare = acme.on_host("localhost:3000");
    bare.get("/counter").await.assert(StatusCode::OK, "0");

    // Upper case names the same tenant; the session is intact on its own tenant.
    let mut upper = acme.on_host("ACME.localhost:3000");
    upper.get("/counter").await.assert(StatusCode::OK, "2");
    acme.get("/me").await.assert(StatusCode::OK, "alice");

    // Same user name, another tenant: a separate user.
    let mut globex_alice = Client::new(&app, "globex.localhost");
    globex_alice.login("alice").await;
    globex_alice
        .get("/sessions")
        .await
        .assert(StatusCode::OK, "1");
    acme.get("/sessions").await.assert(StatusCode::OK, "1");
    globex_alice
        .post("/logout-all")
        .await
        .assert(StatusCode::OK, "1");
    acme.get("/me").await.assert(StatusCode::OK, "alice");
}

#[tokio::test]
async fn bare_hosts_share_the_default_tenant() {
    let app = memory_app().await;
    let mut client = Client::new(&app, "localhost:3000");
    client.post("/counter").await.assert(StatusCode::OK, "1");
    for host in ["localhost", "127.0.0.1:3000", "[::1]:3000", "[::1]"] {
        client
            .on_host(host)
            .get("/counter")
            .await
            .assert(StatusCode::OK, "1");
    }
}

#[tokio::test]
async fn duplicated_cookies_use_the_first_valid_one() {
    let app = memory_app().await;
    let mut client = Client::new(&app, "localhost");
    client.post("/counter").await;
    client.post("/counter").await;
    let valid = client.cookie().to_owned();

    let headers = [
        format!("{COOKIE_NAME}=garbage; {valid}"),
        format!("{valid}; {COOKIE_NAME}=AAAAAAAAAAAAAAAAAAAAAA"),
        format!("other=1; {COOKIE_NAME}=; {valid}"),
    ];
    for header in &headers {
        let reply = send(
            &app,
            Method::GET,
            "/counter",
            "localhost",
            Some(header),
            None,
        )
        .await;
        reply.assert(StatusCode::OK, "2");
    }
    // The same cookie in two `Cookie` headers.
    let request = Request::builder()
        .uri("/counter")
        .header(header::HOST, "localhost")
        .header(header::COOKIE, format!("{COOKIE_NAME}=bogus"))
        .header(header::COOKIE, &valid)
        .body(Body::empty())
        .unwrap();
    send_request(&app, request)
        .await
        .assert(StatusCode::OK, "2");
}

#[tokio::test]
async fn no_input_gets_a_5xx() {
    let app = memory_app().await;
    let mut logged_in = Client::new(&app, "localhost");
    logged_in.login("mallory").await;
    let valid = logged_in.cookie().to_owned();

    let long_value = format!("{COOKIE_NAME}={}", "A".repeat(5000));
    let many = vec![format!("{COOKIE_NAME}=x"); 200].join("; ");
    let cookies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"id".to_vec(),
        b"id=".to_vec(),
        b"=;;=;".to_vec(),
        b"id=\"\"".to_vec(),
        b"id=%00%01%02".to_vec(),
        b"id=AAAAAAAAAAAAAAAAAAAAA!".to_vec(),
        b"id=\xff\xfe".to_vec(),
        long_value.into_bytes(),
        many.into_bytes(),
        format!("{valid}x").into_bytes(),
        format!("{valid}; {valid}; {valid}").into_bytes(),
    ];
    let hosts: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b".".to_vec(),
        b"..".to_vec(),
        b":".to_vec(),
        b"[".to_vec(),
        b"[]".to_vec(),
        b"[]:80".to_vec(),
        b"localhost:99999999999999999999".to_vec(),
        b"a.b.c.d.e.f.localhost".to_vec(),
        b"xn--bcher-kva.localhost".to_vec(),
        b"user@acme.localhost".to_vec(),
        b"acme.localhost/evil".to_vec(),
        b"\xffacme.localhost".to_vec(),
        "a".repeat(10_000).into_bytes(),
        format!("{}.localhost", "a".repeat(10_000)).into_bytes(),
    ];
    let routes = [
        (Method::GET, "/"),
        (Method::GET, "/counter"),
        (Method::POST, "/counter"),
        (Method::POST, "/login"),
        (Method::GET, "/me"),
        (Method::GET, "/sessions"),
        (Method::POST, "/logout"),
        (Method::POST, "/logout-all"),
        (Method::GET, "/health"),
        (Method::GET, "/nowhere"),
    ];
    for (method, path) in &routes {
        for cookie in &cookies {
            for host in [b"localhost".as_slice(), b"acme.localhost"] {
                let request = Request::builder()
                    .method(method.clone())
                    .uri(*path)
                    .header(header::HOST, HeaderValue::from_bytes(host).unwrap())
                    .header(header::COOKIE, HeaderValue::from_bytes(cookie).unwrap())
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Body::from("user=%ff%fe&user"))
                    .unwrap();
                let reply = send_request(&app, request).await;
                assert!(
                    reply.status.as_u16() < 500,
                    "{method} {path} cookie {cookie:?}: {reply:?}"
                );
            }
        }
        for host in &hosts {
            let request = Request::builder()
                .method(method.clone())
                .uri(*path)
                .header(header::HOST, HeaderValue::from_bytes(host).unwrap())
                .header(header::COOKIE, &valid)
                .body(Body::empty())
                .unwrap();
            let reply = send_request(&app, request).await;
            assert!(
                reply.status.as_u16() < 500,
                "{method} {path} host {host:?}: {reply:?}"
            );
        }
    }
}

#[tokio::test]
async fn health_without_redis_reports_disabled() {
    let app = memory_app().await;
    let reply = send(&app, Method::GET, "/health", "localhost", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["redis"], "disabled");
    assert_eq!(json["fallback_active"], false);
    // `/health` answers whatever the host.
    let reply = send(
        &app,
        Method::GET,
        "/health",
        "bad_label.localhost",
        None,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// The app on Redis through a Redis outage (two instances, Redis killed, then restarted with
/// its data): logged-in users stay logged in on the instance that served them, writes are kept
/// and reach Redis afterwards, a session the serving instance never saw reads as none and a
/// write to it starts a new session (never a `5xx`), and `/health` says what is going on, then
/// returns to healthy by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_loses_no_session_and_no_write() {
    let Some(mut server) = crate::support::RedisServer::start_persistent() else {
        return;
    };
    let config = Config {
        redis_url: Some(server.url()),
        ..Config::default()
    };
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    let mut client = Client::new(&one, "localhost");
    client.login("alice").await.assert(StatusCode::OK, "alice");
    client.post("/counter").await.assert(StatusCode::OK, "1");

    server.stop();
    client.get("/me").await.assert(StatusCode::OK, "alice");
    client.post("/counter").await.assert(StatusCode::OK, "2");
    client.get("/counter").await.assert(StatusCode::OK, "2");
    // The other instance never saw this session: it reads as none, and a write starts a new
    // session with a new cookie; the old session is left as it is.
    let mut elsewhere = client.on(&two);
    elsewhere.get("/counter").await.assert(StatusCode::OK, "0");
    elsewhere
        .get("/me")
        .await
        .assert(StatusCode::UNAUTHORIZED, "not logged in\n");
    elsewhere
        .get("/sessions")
        .await
        .assert(StatusCode::UNAUTHORIZED, "not logged in\n");
    elsewhere.post("/counter").await.assert(StatusCode::OK, "1");
    assert_ne!(elsewhere.cookie, client.cookie, "a new session");
    let report = health(&one).await;
    assert_eq!(report["redis"], "unhealthy", "{report}");
    assert_eq!(report["fallback_active"], true, "{report}");
    assert_eq!(report["sessions"]["active"], true, "{report}");
    assert!(
        report["sessions"]["journal_len"].as_u64().unwrap() >= 1,
        "{report}"
    );

    server.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let report = health(&one).await;
        if report["redis"] == "healthy" && report["fallback_active"] == false {
            assert_eq!(report["sessions"]["journal_len"], 0, "{report}");
            assert_eq!(report["sessions"]["dropped"], 0, "{report}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{report}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    elsewhere
        .get("/me")
        .await
        .assert(StatusCode::UNAUTHORIZED, "not logged in\n");
    elsewhere.get("/counter").await.assert(StatusCode::OK, "1");
    let mut original = client.on(&two);
    original.get("/me").await.assert(StatusCode::OK, "alice");
    original.get("/counter").await.assert(StatusCode::OK, "2");
    original.post("/counter").await.assert(StatusCode::OK, "3");
}

#[tokio::test]
async fn unreachable_redis_degrades_and_health_says_so() {
    // Port 1 refuses connections at once.
    let config = Config {
        redis_url: Some("redis://127.0.0.1:1".to_owned()),
        ..Config::default()
    };
    let app = build(&config).await.unwrap();

    let health = |reply: Reply| -> serde_json::Value {
        assert_eq!(reply.status, StatusCode::OK);
        serde_json::from_str(&reply.body).unwrap()
    };
    let json = health(send(&app, Method::GET, "/health", "localhost", None, None).await);
    assert_eq!(json["redis"], "unhealthy", "{json}");
    assert!(json["fallback_active"].is_boolean(), "{json}");
    // The breaker opens after a few failures in a row; then the fallback is reported active.
    for _ in 0..3 {
        send(&app, Method::GET, "/health", "localhost", None, None).await;
    }
    let json = health(send(&app, Method::GET, "/health", "localhost", None, None).await);
    assert_eq!(json["redis"], "unhealthy", "{json}");
    assert_eq!(json["fallback_active"], true, "{json}");

    // Every route still answers, without a 5xx: sessions started now live in this instance's
    // local copy (and its journal) until Redis answers.
    let mut client = Client::new(&app, "localhost");
    client.get("/counter").await.assert(StatusCode::OK, "0");
    client.post("/counter").await.assert(StatusCode::OK, "1");
    client.login("alice").await.assert(StatusCode::OK, "alice");
    client.get("/me").await.assert(StatusCode::OK, "alice");
    client.get("/counter").await.assert(StatusCode::OK, "1");
    client.get("/sessions").await.assert(StatusCode::OK, "1");
    assert_eq!(client.post("/logout").await.status, StatusCode::OK);
    assert_eq!(client.get("/me").await.status, StatusCode::UNAUTHORIZED);
    let json = health(send(&app, Method::GET, "/health", "localhost", None, None).await);
    // Journaled: the new session, the login (an id change), the logout.
    assert_eq!(json["sessions"]["journal_len"], 3, "{json}");
}

/// A memory store whose user indexes can be made to fail.
#[derive(Debug, Default)]
struct FlakyUserIndex {
    sessions: MemoryStore,
    failing: Arc<AtomicBool>,
}

impl FlakyUserIndex {
    fn check(&self) -> Result<(), StoreError> {
        match self.failing.load(Ordering::Relaxed) {
            true => Err(StoreError::Unavailable {
                source: "user index down (test)".into(),
            }),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl SessionStore for FlakyUserIndex {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        self.sessions.load(key).await
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        self.sessions.create(key, record).await
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        self.sessions.update(key, patch).await
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        self.sessions.cycle(old, old_user, new, record).await
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        self.sessions.delete(key, user).await
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        self.check()?;
        self.sessions.list_user_sessions(user).await
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        self.check()?;
        self.sessions.delete_user_sessions(user).await
    }
}

#[tokio::test]
async fn user_index_failures_answer_503() {
    let store = FlakyUserIndex::default();
    let failing = Arc::clone(&store.failing);
    let layer = SessionLayer::new(store).with_secure(false);
    let admin = layer.user_sessions();
    let app = app(layer, unlimited(), HealthSource::Disabled);
    let mut client = Client::new(&app, "localhost");
    client.login("frank").await;

    failing.store(true, Ordering::Relaxed);
    for reply in [
        client.get("/sessions").await,
        client.post("/logout-all").await,
    ] {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
        assert_eq!(reply.body, "session store unavailable; try again later\n");
        assert!(
            reply.set_cookie.is_empty(),
            "a failed logout-all keeps the session: {reply:?}"
        );
    }
    client.get("/me").await.assert(StatusCode::OK, "frank");

    failing.store(false, Ordering::Relaxed);
    client.get("/sessions").await.assert(StatusCode::OK, "1");
    let listed = admin
        .list(&Tenant::default_tenant(), "frank")
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    client.post("/logout-all").await.assert(StatusCode::OK, "1");
}

#[tokio::test]
async fn cookie_settings_follow_the_config() {
    let config = Config {
        session_secret: Some("a secret every instance shares".to_owned()),
        cookie_secure: true,
        ..Config::default()
    };
    let app = build(&config).await.unwrap();
    let mut client = Client::new(&app, "localhost");
    let reply = client.post("/counter").await;
    assert!(
        reply.session_cookie().unwrap().contains("Secure"),
        "{reply:?}"
    );
    client.post("/counter").await.assert(StatusCode::OK, "2");

    // A signed cookie with one character changed is refused.
    let cookie = client.cookie().to_owned();
    let (name, value) = cookie.split_once('=').unwrap();
    let last = value.chars().last().unwrap();
    let forged = format!(
        "{name}={}{}",
        &value[..value.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    let reply = send(
        &app,
        Method::GET,
        "/counter",
        "localhost",
        Some(&forged),
        None,
    )
    .await;
    reply.assert(StatusCode::OK, "0");
}

#[tokio::test]
async fn instances_sharing_a_store_and_secret_share_sessions() {
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
    let instance = |secret: &str| {
        let key = SigningKey::from_secret(secret).unwrap();
        let layer = SessionLayer::from_shared_store(Arc::clone(&store))
            .with_secure(false)
            .with_signing_key(key);
        app(layer, unlimited(), HealthSource::Disabled)
    };
    let (one, two, stranger) = (
        instance("shared secret"),
        instance("shared secret"),
        instance("other secret"),
    );

    let mut client = Client::new(&one, "acme.localhost");
    client.post("/counter").await;
    client.login("grace").await;
    let cookie = client.cookie().to_owned();
    send(
        &two,
        Method::POST,
        "/counter",
        "acme.localhost",
        Some(&cookie),
        None,
    )
    .await
    .assert(StatusCode::OK, "2");
    send(
        &two,
        Method::GET,
        "/me",
        "acme.localhost",
        Some(&cookie),
        None,
    )
    .await
    .assert(StatusCode::OK, "grace");
    client.get("/counter").await.assert(StatusCode::OK, "2");
    // A key derived from another secret refuses the cookie, so the same store yields nothing.
    send(
        &stranger,
        Method::GET,
        "/counter",
        "acme.localhost",
        Some(&cookie),
        None,
    )
    .await
    .assert(StatusCode::OK, "0");
}

#[test]
fn config_reads_the_environment_contract() {
    let none: [(&str, &str); 0] = [];
    let config = Config::from_vars(none).unwrap();
    assert_eq!(config, Config::default());
    assert_eq!(config.bind, "127.0.0.1:3000");
    assert_eq!(config.redis_url, None);
    assert!(!config.cookie_secure);

    let config = Config::from_vars([
        ("BIND", "0.0.0.0:8080"),
        ("REDIS_URL", "redis://:hunter2@127.0.0.1:6379/2"),
        ("SESSION_SECRET", "s3cret"),
        ("COOKIE_SECURE", "1"),
    ])
    .unwrap();
    assert_eq!(config.bind, "0.0.0.0:8080");
    assert_eq!(
        config.redis_url.as_deref(),
        Some("redis://:hunter2@127.0.0.1:6379/2")
    );
    assert_eq!(config.session_secret.as_deref(), Some("s3cret"));
    assert!(config.cookie_secure);
    let debug = format!("{config:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("s3cret"),
        "{debug}"
    );

    // Empty counts as unset, except for the secret.
    let config =
        Config::from_vars([("REDIS_URL", ""), ("BIND", ""), ("COOKIE_SECURE", "0")]).unwrap();
    assert_eq!(config, Config::default());
    assert!(matches!(
        Config::from_vars([("SESSION_SECRET", "")]),
        Err(StartupError::SigningKey(_))
    ));

    let error = Config::from_vars([("COOKIE_SECURE", "yes")]).unwrap_err();
    assert!(
        matches!(
            error,
            StartupError::Invalid {
                variable: "COOKIE_SECURE",
                ..
            }
        ),
        "{error:?}"
    );

    // A cluster: its seed URLs.
    let config = Config::from_vars([
        (
            "REDIS_CLUSTER_URLS",
            "redis://10.0.0.1:6379,redis://10.0.0.2:6379",
        ),
        ("REDIS_URL", "redis://127.0.0.1"),
    ])
    .unwrap();
    assert_eq!(
        config.redis_cluster.unwrap(),
        ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]
    );
    // A cluster and a Sentinel at once is ambiguous: refused.
    let error = Config::from_vars([
        ("REDIS_CLUSTER_URLS", "redis://10.0.0.1:6379"),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
        ("REDIS_SENTINEL_URLS", "redis://10.0.0.1:26379"),
    ])
    .unwrap_err();
    assert!(
        matches!(
            error,
            StartupError::Invalid {
                variable: "REDIS_CLUSTER_URLS",
                ..
            }
        ),
        "{error:?}"
    );

    // Sentinel: both variables, or neither.
    let config = Config::from_vars([
        ("REDIS_SENTINEL_MASTER", "mymaster"),
        (
            "REDIS_SENTINEL_URLS",
            "redis://10.0.0.1:26379, redis://10.0.0.2:26379",
        ),
        ("REDIS_URL", "redis://127.0.0.1"),
    ])
    .unwrap();
    let sentinel = config.redis_sentinel.unwrap();
    assert_eq!(sentinel.master, "mymaster");
    assert_eq!(
        sentinel.urls,
        ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]
    );
    for (set, missing) in [
        ("REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_URLS"),
        ("REDIS_SENTINEL_URLS", "REDIS_SENTINEL_MASTER"),
    ] {
        let error = Config::from_vars([(set, "x")]).unwrap_err();
        assert!(
            matches!(error, StartupError::Invalid { variable, .. } if variable == missing),
            "{error:?}"
        );
    }

    let config = Config::from_vars([
        ("RATE_LIMIT", "10/1s"),
        ("TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1"),
    ])
    .unwrap();
    assert_eq!(
        config.rate_limit,
        Quota::new(10, std::time::Duration::from_secs(1)).unwrap()
    );
    assert_eq!(config.trusted_proxies, ["10.0.0.0/8", "192.0.2.1"]);
    assert_eq!(config.max_sessions_per_user, None);
    let capped = Config::from_vars([("MAX_SESSIONS_PER_USER", "2")]).unwrap();
    assert_eq!(capped.max_sessions_per_user, Some(2));
    for (variable, value) in [
        ("RATE_LIMIT", "lots"),
        ("RATE_LIMIT", "10/1d"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("TRUSTED_PROXIES", "proxy.example"),
        ("MAX_SESSIONS_PER_USER", "0"),
        ("MAX_SESSIONS_PER_USER", "two"),
    ] {
        let error = Config::from_vars([(variable, value)]).unwrap_err();
        assert!(
            matches!(error, StartupError::Invalid { variable: v, .. } if v == variable),
            "{variable}={value}: {error:?}"
        );
    }
}

#[tokio::test]
async fn an_invalid_redis_url_is_refused_at_build() {
    let config = Config {
        redis_url: Some("not a url".to_owned()),
        ..Config::default()
    };
    assert!(matches!(build(&config).await, Err(StartupError::Redis(_))));
}

/// A GET from a client address, on a host, read whole: (status, headers, body).
async fn get_from(
    app: &Router,
    ip: &str,
    host: &str,
    path: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut request = Request::get(path)
        .header(header::HOST, host)
        .body(Body::empty())
        .unwrap();
    let addr: std::net::SocketAddr = format!("{ip}:50000").parse().unwrap();
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn every_route_but_health_is_rate_limited_per_client_ip_and_tenant() {
    let config = Config::from_vars([("RATE_LIMIT", "3/60s")]).unwrap();
    let app = build(&config).await.unwrap();
    for path in ["/", "/counter", "/me"] {
        let (status, headers, _) = get_from(&app, "198.51.100.1", "localhost", path).await;
        assert_ne!(status, StatusCode::TOO_MANY_REQUESTS, "{path}");
        let state = headers
            .get("ratelimit")
            .expect("allowed responses carry RateLimit");
        assert!(state.to_str().unwrap().starts_with("\"per-ip\";r="));
    }
    let (status, headers, body) = get_from(&app, "198.51.100.1", "localhost", "/counter").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "whole seconds, at least 1");
    assert_eq!(headers["ratelimit-policy"], "\"per-ip\";q=3;w=60");
    assert!(
        headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with("\"per-ip\";r=0;t=")
    );

    // /health is never limited.
    for _ in 0..10 {
        let (status, _, body) = get_from(&app, "198.51.100.1", "localhost", "/health").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Another client, and the same client on another tenant, have their own counters.
    let (status, _, _) = get_from(&app, "198.51.100.2", "localhost", "/").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get_from(&app, "198.51.100.1", "acme.localhost", "/").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    let config =
        Config::from_vars([("RATE_LIMIT", "1/60s"), ("TRUSTED_PROXIES", "10.0.0.0/8")]).unwrap();
    let app = build(&config).await.unwrap();
    let via = |peer: &'static str, xff: &'static str| {
        let app = app.clone();
        async move {
            let mut request = Request::get("/")
                .header(header::HOST, "localhost")
                .header("x-forwarded-for", xff)
                .body(Body::empty())
                .unwrap();
            let addr: std::net::SocketAddr = format!("{peer}:50000").parse().unwrap();
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(addr));
            app.oneshot(request).await.unwrap().status()
        }
    };
    assert_eq!(via("10.0.0.1", "198.51.100.7").await, StatusCode::OK);
    assert_eq!(
        via("10.0.0.1", "1.1.1.1, 198.51.100.7").await,
        StatusCode::TOO_MANY_REQUESTS,
        "a forged left-most hop changes nothing"
    );
    assert_eq!(via("10.0.0.1", "198.51.100.8").await, StatusCode::OK);
    // An untrusted peer's header is ignored: its own address is the key.
    assert_eq!(via("203.0.113.1", "198.51.100.9").await, StatusCode::OK);
    assert_eq!(
        via("203.0.113.1", "198.51.100.10").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

// ---------------------------------------------------------------------------------------------
// On a Redis Cluster and on Sentinel: two instances share sessions and limits.

/// Two instances of the app on the same Redis: a session made on one is used and changed on
/// the other, and a limit of 8 per client and tenant lets exactly 8 through over both.
async fn two_instances_share_sessions_and_limits(one: &Router, two: &Router) {
    let mut alice = Client::new(one, "acme.localhost");
    alice.post("/counter").await.assert(StatusCode::OK, "1");
    alice.login("alice").await.assert(StatusCode::OK, "alice");
    let mut on_two = alice.on(two);
    on_two.get("/counter").await.assert(StatusCode::OK, "1");
    on_two.get("/me").await.assert(StatusCode::OK, "alice");
    on_two.post("/counter").await.assert(StatusCode::OK, "2");
    alice.get("/counter").await.assert(StatusCode::OK, "2");

    for tenant in ["acme.localhost", "globex.localhost"] {
        let mut allowed = 0;
        for attempt in 0..20 {
            let app = if attempt % 2 == 0 { one } else { two };
            let (status, _, _) = get_from(app, "198.51.100.9", tenant, "/").await;
            allowed += usize::from(status == StatusCode::OK);
        }
        assert_eq!(
            allowed, 8,
            "{tenant}: exactly the limit over both instances"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_redis_cluster() {
    let Some(cluster) = crate::support::RedisCluster::start_masters_only() else {
        return;
    };
    let config = Config::from_vars([
        ("REDIS_CLUSTER_URLS", cluster.urls().join(",")),
        ("RATE_LIMIT", "8/60s".to_owned()),
    ])
    .unwrap();
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    two_instances_share_sessions_and_limits(&one, &two).await;
    // The health check's one round trip (PING, INFO memory) works on a cluster too.
    let report = health(&one).await;
    assert_eq!(report["redis"], "healthy", "{report}");
    assert!(report["memory"]["policy"].is_string(), "{report}");
    let keys = cluster.keys();
    assert!(keys.iter().any(|k| k.contains(":session:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains(":user:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("acme:rl:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("globex:rl:")), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_sentinel() {
    let Some(group) = crate::support::SentinelGroup::start() else {
        return;
    };
    let config = Config::from_vars([
        (
            "REDIS_SENTINEL_MASTER",
            crate::support::SentinelGroup::MASTER.to_owned(),
        ),
        ("REDIS_SENTINEL_URLS", group.sentinel_urls().join(",")),
        ("RATE_LIMIT", "8/60s".to_owned()),
    ])
    .unwrap();
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    two_instances_share_sessions_and_limits(&one, &two).await;
    assert!(
        group.master.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap() >= 4,
        "sessions, the index and the counts are on the master"
    );
}

// ---------------------------------------------------------------------------------------------
// On PostgreSQL (`DATABASE_URL`), alone and behind Redis.

/// `DATABASE_URL` alone: two instances share sessions (a login, the listing, "log out
/// everywhere"), a rebuilt instance keeps them, `/health` says where they are, and the rate
/// limit is each instance's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_share_sessions() {
    let Some(schema) = crate::support::postgres::PgSchema::create().await else {
        return;
    };
    let config = Config {
        database_url: Some(schema.url()),
        rate_limit: Quota::per_minute(8),
        ..Config::default()
    };
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    let mut alice = Client::new(&one, "acme.localhost");
    alice.post("/counter").await.assert(StatusCode::OK, "1");
    alice.login("alice").await.assert(StatusCode::OK, "alice");
    let mut on_two = alice.on(&two);
    on_two.get("/me").await.assert(StatusCode::OK, "alice");
    on_two.post("/counter").await.assert(StatusCode::OK, "2");
    let mut laptop = Client::new(&two, "acme.localhost");
    laptop.login("alice").await.assert(StatusCode::OK, "alice");
    alice.get("/sessions").await.assert(StatusCode::OK, "2");
    // A cookie replayed on another tenant finds nothing.
    alice
        .on_host("globex.localhost")
        .get("/me")
        .await
        .assert(StatusCode::UNAUTHORIZED, "not logged in\n");

    let rebuilt = build(&config).await.unwrap();
    let mut again = alice.on(&rebuilt);
    again.get("/counter").await.assert(StatusCode::OK, "2");
    again.post("/logout-all").await.assert(StatusCode::OK, "2");
    laptop
        .get("/me")
        .await
        .assert(StatusCode::UNAUTHORIZED, "not logged in\n");

    let reply = send(&one, Method::GET, "/health", "localhost", None, None).await;
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["redis"], "disabled", "{json}");
    assert_eq!(json["fallback_active"], false, "{json}");
    assert_eq!(json["storage"], "postgres", "{json}");
    assert_eq!(json["postgres"], "healthy", "{json}");

    // Limits are counted per instance: 8 on each.
    let mut allowed = 0;
    for attempt in 0..20 {
        let app = if attempt % 2 == 0 { &one } else { &two };
        let (status, _, _) = get_from(app, "198.51.100.7", "initech.localhost", "/").await;
        allowed += usize::from(status == StatusCode::OK);
    }
    assert_eq!(allowed, 16, "8 per instance");
}

/// `DATABASE_URL` and `REDIS_URL`: two instances share sessions and one limit; with Redis
/// killed, every route still answers from PostgreSQL and `/health` says so; back, Redis serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_serves_through_a_redis_outage() {
    let Some(mut server) = crate::support::RedisServer::start() else {
        return;
    };
    let Some(schema) = crate::support::postgres::PgSchema::create().await else {
        return;
    };
    let config = Config {
        database_url: Some(schema.url()),
        redis_url: Some(server.url()),
        rate_limit: Quota::per_minute(8),
        ..Config::default()
    };
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    two_instances_share_sessions_and_limits(&one, &two).await;

    let mut client = Client::new(&one, "localhost");
    client.login("bob").await.assert(StatusCode::OK, "bob");
    client.post("/counter").await.assert(StatusCode::OK, "1");
    server.stop();
    let mut on_two = client.on(&two);
    on_two.get("/me").await.assert(StatusCode::OK, "bob");
    on_two.post("/counter").await.assert(StatusCode::OK, "2");
    client.get("/counter").await.assert(StatusCode::OK, "2");
    client.get("/sessions").await.assert(StatusCode::OK, "1");
    let mut newcomer = Client::new(&two, "localhost");
    newcomer.post("/counter").await.assert(StatusCode::OK, "1");
    let reply = send(&one, Method::GET, "/health", "localhost", None, None).await;
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["redis"], "unhealthy", "{json}");
    assert_eq!(json["storage"], "redis+postgres", "{json}");
    assert_eq!(json["postgres"], "healthy", "{json}");

    server.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for app in [&one, &two] {
        loop {
            let reply = send(app, Method::GET, "/health", "localhost", None, None).await;
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            if json["redis"] == "healthy" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{json}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    client.get("/counter").await.assert(StatusCode::OK, "2");
    // The writes during the outage moved the generation of Redis copies on; an instance takes
    // up to the refresh interval (250 ms) to follow, and may serve its older copies until then.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    client.get("/counter").await.assert(StatusCode::OK, "2");
    on_two.post("/counter").await.assert(StatusCode::OK, "3");
    client.get("/counter").await.assert(StatusCode::OK, "3");
    let copies = server.cli(&["--scan", "--pattern", "*:session:*"]);
    assert!(!copies.trim().is_empty(), "Redis holds copies again");
}

#[tokio::test]
async fn an_invalid_database_url_is_refused_at_build() {
    let config = Config {
        database_url: Some("mysql://127.0.0.1/app".to_owned()),
        ..Config::default()
    };
    assert!(matches!(
        build(&config).await,
        Err(StartupError::Invalid {
            variable: "DATABASE_URL",
            ..
        })
    ));
    let config = Config {
        database_url: Some("postgres://[bad".to_owned()),
        ..Config::default()
    };
    assert!(matches!(
        build(&config).await,
        Err(StartupError::Database(_))
    ));
}

/// What the app logs, kept for a test to read.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Redis set to evict keys under memory pressure: the app warns at start, and `/health`
/// says so.
#[tokio::test]
async fn a_redis_that_may_evict_is_reported_at_start_and_in_health() {
    let Some(server) = crate::support::RedisServer::start_with_args(
        false,
        ["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]
            .map(str::to_owned)
            .to_vec(),
    ) else {
        return;
    };
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let config = Config {
        redis_url: Some(server.url()),
        ..Config::default()
    };
    let app = build(&config).await.unwrap();
    drop(guard);
    let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("WARN") && logged.contains("maxmemory-policy volatile-lru"),
        "{logged}"
    );

    let reply = send(&app, Method::GET, "/health", "localhost", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["redis"], "healthy");
    assert_eq!(json["eviction_risk"], "volatile-lru", "{json}");
}

/// Redis runs out of memory (`maxmemory` reached under `noeviction`) in the middle of a load
/// on two instances: no request gets a `5xx`, reads keep coming from Redis, `/health` says
/// Redis is degraded and why, and once memory is freed every acknowledged write is in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_costs_no_acknowledged_write() {
    const USERS: usize = 6;
    const WRITES: usize = 30;
    let Some(server) = crate::support::RedisServer::start() else {
        return;
    };
    let (one, two) = two_instances(&server).await;
    // Users alternate between the instances; each logs in on its own.
    let instance = |user: usize| if user.is_multiple_of(2) { &one } else { &two };
    let mut clients = Vec::new();
    for user in 0..USERS {
        let mut client = Client::new(instance(user), "localhost");
        let name = format!("user{user}");
        client.login(&name).await.assert(StatusCode::OK, &name);
        clients.push((client, name));
    }

    // Each user writes in a loop; memory runs out a third of the way in, and comes back at
    // two thirds. Every answer is a 200 with the next count.
    let full = Arc::new(tokio::sync::Barrier::new(USERS + 1));
    let freed = Arc::new(tokio::sync::Barrier::new(USERS + 1));
    let mut load = Vec::new();
    for (mut client, name) in clients {
        let (full, freed) = (full.clone(), freed.clone());
        load.push(tokio::spawn(async move {
            for n in 1..=WRITES {
                if n == WRITES / 3 + 1 {
                    full.wait().await;
                }
                if n == 2 * WRITES / 3 + 1 {
                    freed.wait().await;
                }
                let reply = client.post("/counter").await;
                assert_eq!(
                    (reply.status, reply.body.as_str()),
                    (StatusCode::OK, &*n.to_string())
                );
                // Reads during the shortage are answered too.
                client.get("/me").await.assert(StatusCode::OK, &name);
            }
            client
        }));
    }
    full.wait().await;
    server.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    // The writes of this third are refused by Redis: the app keeps them.
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let report = health(&one).await;
            if report["redis"] == "degraded" {
                return report;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("/health says degraded while Redis refuses writes");
    assert_eq!(refused["refusing_writes"], true, "{refused}");
    assert!(
        refused["last_write_refusal"]
            .as_str()
            .unwrap()
            .contains("OOM"),
        "{refused}"
    );
    assert!(
        refused["writes_refused"].as_u64().unwrap() >= 1,
        "{refused}"
    );
    assert_eq!(
        refused["healthy"], true,
        "reads still go to Redis: {refused}"
    );
    // A session that starts now is kept too.
    let mut newcomer = Client::new(&one, "localhost");
    newcomer.post("/counter").await.assert(StatusCode::OK, "1");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let during = health(&one).await;
    assert_eq!(during["redis"], "degraded", "{during}");
    assert_eq!(during["fallback_active"], true, "{during}");
    server.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    freed.wait().await;
    let mut clients = Vec::new();
    for task in load {
        clients.push(task.await.expect("no request failed"));
    }

    // Once memory is back, both instances replay what they journaled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for app in [&one, &two] {
        loop {
            let report = health(app).await;
            if report["redis"] == "healthy" && report["fallback_active"] == false {
                assert_eq!(report["sessions"]["journal_len"], 0, "{report}");
                assert_eq!(report["sessions"]["dropped"], 0, "{report}");
                assert!(
                    report["sessions"]["replayed"].as_u64().unwrap() >= 1,
                    "{report}"
                );
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{report}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Every acknowledged count is in Redis: the other instance (which never held the
    // session) reads it from there.
    for (user, client) in clients.iter().enumerate() {
        let mut elsewhere = client.on(instance(user + 1));
        elsewhere
            .get("/counter")
            .await
            .assert(StatusCode::OK, &WRITES.to_string());
    }
    newcomer
        .on(&two)
        .get("/counter")
        .await
        .assert(StatusCode::OK, "1");
}

/// `GET /metrics`: the crate's metrics in the Prometheus text format, every counter listed
/// from the start, counts that move with traffic; outside the rate limit and the sessions.
#[tokio::test]
async fn metrics_are_served_in_the_prometheus_format() {
    let app = build(&Config {
        rate_limit: Quota::per_minute(2),
        ..Config::default()
    })
    .await
    .unwrap();
    let count = |body: &str, series: &str| -> f64 {
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} in\n{body}"))
    };
    let reply = send(&app, Method::GET, "/metrics", "localhost", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; version=0.0.4")
    );
    assert!(reply.set_cookie.is_empty(), "{:?}", reply.set_cookie);
    for series in [
        "turnstile_session_copy_total{outcome=\"hit\"}",
        "turnstile_session_copy_total{outcome=\"invalidated\"}",
        "turnstile_session_fallback_transitions_total{to=\"local\"}",
        "turnstile_session_journaled_total",
        "turnstile_session_replayed_total",
        "turnstile_breaker_transitions_total{to=\"open\"}",
        "turnstile_connections",
    ] {
        count(&reply.body, series);
    }
    assert!(
        reply
            .body
            .contains("# HELP turnstile_ratelimit_denied_total")
    );
    let denied = count(&reply.body, "turnstile_ratelimit_denied_total");

    // Past the limit of 2: refused, and counted.
    let mut client = Client::new(&app, "localhost");
    for _ in 0..3 {
        client.get("/counter").await;
    }
    for _ in 0..5 {
        let reply = send(&app, Method::GET, "/metrics", "localhost", None, None).await;
        assert_eq!(reply.status, StatusCode::OK, "never rate limited");
    }
    let body = send(&app, Method::GET, "/metrics", "localhost", None, None)
        .await
        .body;
    assert!(
        count(&body, "turnstile_ratelimit_denied_total") >= denied + 1.0,
        "{body}"
    );
    assert!(
        count(&body, "turnstile_ratelimit_allowed_total") >= 2.0,
        "{body}"
    );
}

/// `REDIS_ENABLED=0` (or `false`) keeps the app in memory whatever Redis variables are set:
/// `/health` says Redis is disabled, and sessions work. Anything but `0`, `false`, `1` or
/// `true` is refused at start.
#[tokio::test]
async fn redis_enabled_0_keeps_the_app_in_memory() {
    for off in ["0", "false"] {
        let config = Config::from_vars([
            ("REDIS_ENABLED", off),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("REDIS_CLUSTER_URLS", "redis://127.0.0.1:7000"),
        ])
        .unwrap();
        assert_eq!(config.redis_url, None, "REDIS_ENABLED={off}");
        assert_eq!(config.redis_cluster, None, "REDIS_ENABLED={off}");
        let config = Config::from_vars([
            ("REDIS_ENABLED", off),
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            ("REDIS_SENTINEL_URLS", "redis://127.0.0.1:26379"),
        ])
        .unwrap();
        assert_eq!(config.redis_sentinel, None, "REDIS_ENABLED={off}");
    }
    for on in ["1", "true", ""] {
        let config = Config::from_vars([
            ("REDIS_ENABLED", on),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
        ])
        .unwrap();
        assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
    }
    let error = Config::from_vars([("REDIS_ENABLED", "maybe")]).unwrap_err();
    assert!(
        matches!(
            error,
            StartupError::Invalid {
                variable: "REDIS_ENABLED",
                ..
            }
        ),
        "{error:?}"
    );

    // A URL nothing listens on: were it used, `/health` would say unhealthy.
    let config =
        Config::from_vars([("REDIS_ENABLED", "0"), ("REDIS_URL", "redis://127.0.0.1:1")]).unwrap();
    let app = build(&config).await.unwrap();
    let reply = send(&app, Method::GET, "/health", "localhost", None, None).await;
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["redis"], "disabled", "{json}");
    assert_eq!(json["storage"], "memory", "{json}");
    let mut client = Client::new(&app, "localhost");
    client.post("/counter").await.assert(StatusCode::OK, "1");
    client.post("/counter").await.assert(StatusCode::OK, "2");
}

/// Two instances of the app on `server`, with a rate limit no test reaches.
async fn two_instances(server: &crate::support::RedisServer) -> (Router, Router) {
    let config = Config {
        redis_url: Some(server.url()),
        rate_limit: Quota::per_minute(1_000_000),
        ..Config::default()
    };
    (build(&config).await.unwrap(), build(&config).await.unwrap())
}

/// A browser on `app`, logged in as `user` (and seen so by the app).
async fn logged_in(app: &Router, user: &str) -> Client {
    let mut client = Client::new(app, "localhost");
    client.login(user).await.assert(StatusCode::OK, user);
    client.get("/me").await.assert(StatusCode::OK, user);
    client
}

/// Redis killed under two instances, written to while down, and restarted without its data:
/// every logged-in user keeps their session, its data and the write made meanwhile; a user who
/// logged out before, or was logged out everywhere, stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_comes_back_empty_costs_no_logged_in_user() {
    let Some(mut server) = crate::support::RedisServer::start() else {
        return;
    };
    let (one, two) = two_instances(&server).await;
    let instance = |user: usize| if user.is_multiple_of(2) { &one } else { &two };
    let mut users = Vec::new();
    for user in 0..6 {
        let mut client = Client::new(instance(user), "localhost");
        let name = format!("user{user}");
        client.login(&name).await.assert(StatusCode::OK, &name);
        client.post("/counter").await.assert(StatusCode::OK, "1");
        client.post("/counter").await.assert(StatusCode::OK, "2");
        users.push((client, name));
    }
    // Logged out on the other instance than the one that served it.
    let mut left = Client::new(&one, "localhost");
    left.login("left").await.assert(StatusCode::OK, "left");
    left.post("/counter").await.assert(StatusCode::OK, "1");
    let mut left_elsewhere = left.on(&two);
    left_elsewhere
        .post("/logout")
        .await
        .assert(StatusCode::OK, "logged out\n");
    // Logged in on both, logged out everywhere from one.
    let everywhere_one = logged_in(&one, "gone").await;
    let mut everywhere_two = logged_in(&two, "gone").await;
    everywhere_two
        .post("/logout-all")
        .await
        .assert(StatusCode::OK, "2");
    // The invalidations reach the instances that held the ended sessions.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // Redis dies; each user writes once more meanwhile (journaled), then it comes back empty.
    server.stop();
    for (client, _) in &mut users {
        client.post("/counter").await.assert(StatusCode::OK, "3");
    }
    server.restart();
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "Redis came back empty");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for app in [&one, &two] {
        loop {
            let report = health(app).await;
            if report["redis"] == "healthy" && report["fallback_active"] == false {
                assert_eq!(report["sessions"]["dropped"], 0, "{report}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{report}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    for (user, (client, name)) in users.iter().enumerate() {
        // On the instance that served it, then on the other one (which reads Redis).
        for app in [instance(user), instance(user + 1)] {
            let mut client = client.on(app);
            client.get("/me").await.assert(StatusCode::OK, name);
            client.get("/counter").await.assert(StatusCode::OK, "3");
        }
    }
    for app in [&one, &two] {
        let not_logged_in = "not logged in\n";
        left.on(app)
            .get("/me")
            .await
            .assert(StatusCode::UNAUTHORIZED, not_logged_in);
        everywhere_one
            .on(app)
            .get("/me")
            .await
            .assert(StatusCode::UNAUTHORIZED, not_logged_in);
        everywhere_two
            .on(app)
            .get("/me")
            .await
            .assert(StatusCode::UNAUTHORIZED, not_logged_in);
    }
}

/// `GET /events`: the tenant's lifecycle events (a login, a logout, "log out everywhere"),
/// oldest first, each with `kind`, `user` and `at`, never a session id; another tenant's stay
/// apart. On two instances sharing Redis, and in memory.
async fn events_tell_the_tenants_sessions(one: &Router, two: &Router) {
    let mut alice = Client::new(one, "acme.localhost");
    alice.login("alice").await.assert(StatusCode::OK, "alice");
    let cookie = alice.cookie().to_owned();
    alice.post("/logout").await;
    let mut bob = Client::new(two, "acme.localhost");
    bob.login("bob").await.assert(StatusCode::OK, "bob");
    bob.post("/logout-all").await;
    Client::new(one, "globex.localhost").login("carol").await;

    let reply = Client::new(two, "acme.localhost").get("/events").await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = cookie.split_once('=').unwrap().1;
    assert!(!reply.body.contains(id), "no session id: {}", reply.body);
    let events: Vec<serde_json::Value> = serde_json::from_str(&reply.body).unwrap();
    let told: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["user"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        told,
        [
            ("login", "alice"),
            ("logout", "alice"),
            ("login", "bob"),
            ("revoked", "bob"),
            ("logout", "bob")
        ]
    );
    let at: Vec<u64> = events.iter().map(|e| e["at"].as_u64().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]) && at[0] > 0, "{at:?}");
    let globex = Client::new(one, "globex.localhost").get("/events").await;
    let globex: Vec<serde_json::Value> = serde_json::from_str(&globex.body).unwrap();
    assert_eq!(globex.len(), 1);
    assert_eq!(globex[0]["user"], "carol");
}

#[tokio::test]
async fn events_are_listed_per_tenant_in_memory() {
    let app = memory_app().await;
    events_tell_the_tenants_sessions(&app, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_per_tenant_across_instances() {
    let Some(server) = crate::support::RedisServer::start() else {
        return;
    };
    let (one, two) = two_instances(&server).await;
    events_tell_the_tenants_sessions(&one, &two).await;
}

/// `RATE_LIMIT_SHADOW=1`: past `RATE_LIMIT` nobody is refused, the `RateLimit` field says the
/// quota is spent, and `/health`'s `rate_limit` counts the refusals not made; in memory and on
/// Redis.
async fn a_shadow_limit_counts_and_refuses_nobody(app: &Router) {
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let reply = send(app, Method::GET, "/", "localhost", None, None).await;
        statuses.push(reply.status);
    }
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let reply = send(app, Method::GET, "/health", "localhost", None, None).await;
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["rate_limit"]["shadow_refusals"], 3, "{json}");
}

#[tokio::test]
async fn a_shadow_rate_limit_in_memory() {
    let config = Config::from_vars([("RATE_LIMIT", "2/60s"), ("RATE_LIMIT_SHADOW", "1")]).unwrap();
    assert!(config.rate_limit_shadow);
    a_shadow_limit_counts_and_refuses_nobody(&build(&config).await.unwrap()).await;
    let refused = Config::from_vars([("RATE_LIMIT_SHADOW", "maybe")]).unwrap_err();
    assert!(
        matches!(
            refused,
            StartupError::Invalid {
                variable: "RATE_LIMIT_SHADOW",
                ..
            }
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_shadow_rate_limit_on_redis() {
    let Some(server) = crate::support::RedisServer::start() else {
        return;
    };
    let config = Config {
        redis_url: Some(server.url()),
        rate_limit_shadow: true,
        ..Config::from_vars([("RATE_LIMIT", "2/60s")]).unwrap()
    };
    a_shadow_limit_counts_and_refuses_nobody(&build(&config).await.unwrap()).await;
}

/// `RATE_LIMIT_PENALTY=2/3s` on two instances over Redis: a client refused twice within a
/// window of `RATE_LIMIT` is blocked for 3 s, on both instances, with `Retry-After` telling
/// how long; another client and another tenant are not; a bad value is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_penalty_blocks_a_repeat_offender_on_every_instance() {
    let Some(server) = crate::support::RedisServer::start() else {
        return;
    };
    let config = Config::from_vars([
        ("REDIS_URL", server.url()),
        ("RATE_LIMIT", "1/1s".to_owned()),
        ("RATE_LIMIT_PENALTY", "2/3s".to_owned()),
    ])
    .unwrap();
    let one = build(&config).await.unwrap();
    let two = build(&config).await.unwrap();
    // The second instance is serving, so it follows the blocks the first places.
    let (status, _, _) = get_from(&two, "198.51.100.8", "acme.localhost", "/").await;
    assert_eq!(status, StatusCode::OK);

    let wait = |headers: &axum::http::HeaderMap| -> u64 {
        headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut statuses = Vec::new();
    let mut last_wait = 0;
    for _ in 0..3 {
        let (status, headers, _) = get_from(&one, "198.51.100.7", "acme.localhost", "/").await;
        statuses.push(status);
        if status == StatusCode::TOO_MANY_REQUESTS {
            last_wait = wait(&headers);
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(last_wait, 3, "blocked for the penalty's 3 s");
    // Past the window of `RATE_LIMIT`, still blocked, on the other instance too.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (status, headers, _) = get_from(&two, "198.51.100.7", "acme.localhost", "/").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!((1..=2).contains(&wait(&headers)), "{headers:?}");
    let (status, _, _) = get_from(&two, "198.51.100.7", "globex.localhost", "/").await;
    assert_eq!(status, StatusCode::OK, "blocks are per tenant");
    let (status, _, _) = get_from(&one, "198.51.100.9", "acme.localhost", "/").await;
    assert_eq!(status, StatusCode::OK, "and per client");

    for bad in ["0/3s", "2/3", "2/48h", "x"] {
        let refused = Config::from_vars([("RATE_LIMIT_PENALTY", bad)]).unwrap_err();
        assert!(
            matches!(
                refused,
                StartupError::Invalid {
                    variable: "RATE_LIMIT_PENALTY",
                    ..
                }
            ),
            "{bad}: {refused:?}"
        );
    }
}
