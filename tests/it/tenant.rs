//! The tenant layer end to end: every resolver, refusals, and tenant isolation proven against
//! real stores (hostile tenant names never reach Redis, cookies do not cross tenants, users of
//! the same name in two tenants are two users).

use std::convert::Infallible;

use axum::{
    Router,
    body::Body,
    extract::Path,
    routing::{get, post},
};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use tower::{Layer, ServiceExt};
use tower_turnstile::{
    RequestView,
    backend::RedisBackend,
    session::{MemoryStore, RedisStore, Session, SessionLayer},
    tenant::{
        HeaderTenant, HostMap, HostSubdomain, PathPrefix, Tenant, TenantLayer, TenantRejected,
        TenantSource,
    },
};

use crate::support::{
    RedisServer,
    http::{Client, Reply, send},
};

fn x_tenant() -> HeaderName {
    HeaderName::from_static("x-tenant")
}

/// Routes that show what the handler sees, and exercise the session.
fn routes() -> Router {
    async fn count(s: Session) -> String {
        s.get::<u64>("n").await.unwrap().unwrap_or(0).to_string()
    }
    async fn bump(s: Session) -> String {
        let n = s.get::<u64>("n").await.unwrap().unwrap_or(0) + 1;
        s.insert("n", n).await.unwrap();
        n.to_string()
    }
    Router::new()
        .route("/tenant", get(|t: Tenant| async move { t.to_string() }))
        .route(
            "/maybe-tenant",
            get(|t: Option<Tenant>| async move { format!("{t:?}") }),
        )
        .route("/uri", get(|uri: Uri| async move { uri.to_string() }))
        .route("/orders", get(|t: Tenant, uri: Uri| async move { format!("{t} {uri}") }))
        .route("/count", get(count))
        .route("/bump", post(bump))
        .route(
            "/login/{user}",
            post(|Path(user): Path<String>, s: Session| async move {
                s.set_user(user).await.unwrap()
            }),
        )
        .route(
            "/user",
            get(|s: Session| async move {
                let user = s.user_id().await.unwrap();
                user.unwrap_or_else(|| "anonymous".into())
            }),
        )
        .route(
            "/sessions",
            get(|s: Session| async move { s.user_sessions().await.unwrap().len().to_string() }),
        )
        .route(
            "/logout-all",
            post(|s: Session| async move { s.destroy_user_sessions().await.unwrap().to_string() }),
        )
}

/// The routes behind a session layer (in memory) and `tenants`.
fn app(tenants: TenantLayer) -> Router {
    app_with(tenants, SessionLayer::new(MemoryStore::new()))
}

fn app_with(tenants: TenantLayer, sessions: SessionLayer) -> Router {
    routes().layer(sessions).layer(tenants)
}

fn redis_sessions(server: &RedisServer) -> SessionLayer {
    SessionLayer::new(RedisStore::new(RedisBackend::new(&server.url()).unwrap()))
}

/// A request for `uri`, with a `Host` header unless `host` is `None`, and `headers`.
fn request(
    method: &str,
    uri: &str,
    host: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(host) = host {
        builder = builder.header(header::HOST, HeaderValue::from_bytes(host).unwrap());
    }
    for (name, value) in headers {
        builder = builder.header(*name, HeaderValue::from_bytes(value).unwrap());
    }
    builder.body(Body::empty()).unwrap()
}

async fn get_on(app: &Router, host: &str, uri: &str) -> Reply {
    send(app, request("GET", uri, Some(host.as_bytes()), &[])).await
}

/// The tenant the handler sees for `host`, or the refusal's status and body.
async fn tenant_of(app: &Router, host: Option<&[u8]>) -> Result<String, (StatusCode, String)> {
    let reply = send(app, request("GET", "/tenant", host, &[])).await;
    match reply.status {
        StatusCode::OK => Ok(reply.body),
        status => Err((status, reply.body)),
    }
}

/// Sends `request` and returns the whole response, extensions included.
async fn response(app: &Router, request: Request<Body>) -> Response<Body> {
    app.clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|e: Infallible| match e {})
}

fn ok(name: &str) -> Result<String, (StatusCode, String)> {
    Ok(name.to_owned())
}

fn bad_request(result: Result<String, (StatusCode, String)>, context: &str) -> String {
    match result {
        Err((StatusCode::BAD_REQUEST, body)) => body,
        other => panic!("{context}: expected 400, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Resolvers.

#[tokio::test]
async fn host_subdomain_first_label_is_the_reference_rule() {
    let app = app(TenantLayer::new(HostSubdomain::first_label()));
    let long = format!("{}.localhost", "a".repeat(64));
    let longest = format!("{}.localhost", "a".repeat(63));
    for (host, tenant) in [
        ("acme.localhost:3000", "acme"),
        ("acme.localhost", "acme"),
        ("ACME.LocalHost:3000", "acme"),
        ("acme.example.com.", "acme"),
        ("a-1.localhost:", "a-1"),
        ("globex.a.b.c.example.com", "globex"),
        (longest.as_str(), &"a".repeat(63)),
        // Bare hosts and IP literals, with and without ports: the default tenant.
        ("", "default"),
        ("localhost", "default"),
        ("localhost:3000", "default"),
        ("localhost.", "default"),
        ("127.0.0.1", "default"),
        ("127.0.0.1:3000", "default"),
        ("[::1]", "default"),
        ("[::1]:3000", "default"),
        ("::1", "default"),
        ("[2001:db8::1]:8080", "default"),
    ] {
        assert_eq!(
            tenant_of(&app, Some(host.as_bytes())).await,
            ok(tenant),
            "{host:?}"
        );
    }
    // No Host header and no authority: the default tenant.
    assert_eq!(tenant_of(&app, None).await, ok("default"));
    // HTTP/2 style: no Host, the authority in the URI.
    let reply = send(
        &app,
        request("GET", "http://acme.localhost:3000/tenant", None, &[]),
    )
    .await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "acme")
    );

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
        "acme.local host",
        "acme.{x}.localhost",
    ] {
        let body = bad_request(tenant_of(&app, Some(malformed.as_bytes())).await, malformed);
        assert_eq!(body, "the Host header is malformed\n", "{malformed:?}");
    }
    for invalid in [
        "bad_label.localhost",
        "-acme.localhost",
        "acme-.localhost",
        ".localhost",
        "a*b.localhost",
        "{acme}.localhost",
        long.as_str(),
    ] {
        let body = bad_request(tenant_of(&app, Some(invalid.as_bytes())).await, invalid);
        assert!(
            body.starts_with("the Host header names no valid tenant: "),
            "{invalid:?}: {body}"
        );
    }
    // Not text (UTF-8 is not allowed in a Host header), and two Host headers.
    bad_request(
        tenant_of(&app, Some("é.localhost".as_bytes())).await,
        "utf-8",
    );
    bad_request(
        tenant_of(&app, Some(b"acme\xff.localhost")).await,
        "obs-text",
    );
    let mut twice = request("GET", "/tenant", Some(b"acme.localhost"), &[]);
    twice
        .headers_mut()
        .append(header::HOST, HeaderValue::from_static("globex.localhost"));
    assert_eq!(send(&app, twice).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bare_hosts_are_refused_by_choice() {
    let app = app(TenantLayer::new(HostSubdomain::first_label()).with_default_tenant(None));
    assert_eq!(
        tenant_of(&app, Some(b"acme.localhost:3000")).await,
        ok("acme")
    );
    for bare in ["localhost", "localhost:3000", "127.0.0.1", "[::1]:3000", ""] {
        let body = bad_request(tenant_of(&app, Some(bare.as_bytes())).await, bare);
        assert_eq!(body, "the Host header names no tenant\n");
    }
    bad_request(tenant_of(&app, None).await, "no host");

    // Another default tenant instead.
    let public = Tenant::new("public").unwrap();
    let app = self::app(TenantLayer::new(HostSubdomain::first_label()).with_default_tenant(public));
    assert_eq!(tenant_of(&app, Some(b"[::1]:3000")).await, ok("public"));
}

#[tokio::test]
async fn host_subdomain_under_a_base_domain() {
    let app = app(TenantLayer::new(HostSubdomain::new("example.com").unwrap()));
    for (host, tenant) in [
        ("acme.example.com", "acme"),
        ("ACME.Example.COM:8443", "acme"),
        ("acme.example.com.", "acme"),
        ("example.com", "default"),
        ("acme.example.org", "default"),
        ("acme.localhost:3000", "default"),
        ("10.1.2.3", "default"),
        ("[::1]:3000", "default"),
    ] {
        assert_eq!(
            tenant_of(&app, Some(host.as_bytes())).await,
            ok(tenant),
            "{host:?}"
        );
    }
    for invalid in ["www.acme.example.com", "a_b.example.com", ".example.com"] {
        let body = bad_request(tenant_of(&app, Some(invalid.as_bytes())).await, invalid);
        assert!(body.contains("names no valid tenant"), "{invalid:?}");
    }
    assert!(HostSubdomain::new("not a domain").is_err());
    assert!(HostSubdomain::new("").is_err());
}

#[tokio::test]
async fn host_map_maps_exact_hosts() {
    let hosts = HostMap::new()
        .try_with_host("app.acme.com", Tenant::new("acme").unwrap())
        .unwrap()
        .try_with_host("shop.globex.test", Tenant::new("globex").unwrap())
        .unwrap()
        .try_with_host("10.0.0.7", Tenant::new("internal").unwrap())
        .unwrap();
    let app = app(TenantLayer::new(hosts)
        .with_default_tenant(None)
        .with_rejection_status(StatusCode::NOT_FOUND));
    for (host, tenant) in [
        ("app.acme.com", "acme"),
        ("APP.Acme.com:443", "acme"),
        ("app.acme.com.", "acme"),
        ("shop.globex.test:8080", "globex"),
        ("10.0.0.7:80", "internal"),
    ] {
        assert_eq!(
            tenant_of(&app, Some(host.as_bytes())).await,
            ok(tenant),
            "{host:?}"
        );
    }
    for unknown in [
        "acme.com",
        "evil.app.acme.com",
        "localhost",
        "[::1]:3000",
        "",
    ] {
        assert_eq!(
            tenant_of(&app, Some(unknown.as_bytes())).await,
            Err((
                StatusCode::NOT_FOUND,
                "the Host header names no tenant\n".into()
            )),
            "{unknown:?}"
        );
    }
    assert!(
        HostMap::new()
            .try_with_host("a.com:80", Tenant::default())
            .is_err()
    );
}

#[tokio::test]
async fn path_prefix_strips_before_routing_and_keeps_the_query() {
    let tenants = TenantLayer::new(PathPrefix::new("/t").unwrap().with_strip_prefix(true));
    // Stripping must happen before the router routes: wrap the router itself.
    let app = Router::new().fallback_service(tenants.layer(routes()));

    let reply = get_on(&app, "localhost", "/t/acme/orders?page=2&sort=asc").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, "acme /orders?page=2&sort=asc");
    let reply = get_on(&app, "localhost", "/t/ACME/orders").await;
    assert_eq!(reply.body, "acme /orders");
    // Nothing left after the tenant: `/`.
    let nested = Router::new().fallback_service(
        TenantLayer::new(PathPrefix::new("/t").unwrap().with_strip_prefix(true)).layer(
            Router::new().route(
                "/",
                get(|t: Tenant, uri: Uri| async move { format!("{t} {uri}") }),
            ),
        ),
    );
    assert_eq!(get_on(&nested, "x", "/t/acme").await.body, "acme /");
    assert_eq!(get_on(&nested, "x", "/t/acme?q=1").await.body, "acme /?q=1");

    // Without the prefix: the default tenant, path untouched.
    let reply = get_on(&app, "localhost", "/tenant").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "default")
    );
    // Invalid or empty tenant segments are refused, never stripped into something else.
    for path in [
        "/t//orders",
        "/t/a:b/orders",
        "/t/%7Bacme%7D/orders",
        "/t/a*/orders",
        "/t/%C3%BC/orders",
        "/t/a.b/orders",
    ] {
        let reply = get_on(&app, "localhost", path).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(
            reply.body.starts_with("the path names no valid tenant"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn path_prefix_without_stripping_leaves_the_uri() {
    let app = app(TenantLayer::new(PathPrefix::first_segment()));
    let reply = get_on(&app, "localhost", "/acme/anything?x=1").await;
    // The router sees the full path: no route, but the tenant layer let it through.
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let tenants = TenantLayer::new(PathPrefix::first_segment());
    let app =
        Router::new().fallback_service(tenants.layer(
            Router::new().fallback(|t: Tenant, uri: Uri| async move { format!("{t} {uri}") }),
        ));
    let reply = get_on(&app, "localhost", "/Acme/orders?x=1").await;
    assert_eq!(reply.body, "acme /Acme/orders?x=1");
}

#[tokio::test]
async fn header_tenant_reads_one_header() {
    let app = app(TenantLayer::new(HeaderTenant::new(x_tenant())));
    let with = |value: &'static [u8]| {
        request("GET", "/tenant", Some(b"localhost"), &[("x-tenant", value)])
    };
    let reply = send(&app, with(b"Globex")).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "globex")
    );
    assert_eq!(
        tenant_of(&app, Some(b"acme.localhost")).await,
        ok("default")
    );
    for bad in [&b""[..], b"a:b", b"a b", b"{a}", b"\xc3\xbc"] {
        let reply = send(&app, with(bad)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    let mut twice = with(b"acme");
    twice
        .headers_mut()
        .append("x-tenant", HeaderValue::from_static("globex"));
    let reply = send(&app, twice).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body, "the x-tenant header is malformed\n");
}

#[tokio::test]
async fn closures_resolve_and_are_validated() {
    let app = app(TenantLayer::new(|request: &RequestView<'_>| {
        request
            .uri
            .query()
            .and_then(|q| q.strip_prefix("org="))
            .map(str::to_owned)
    }));
    assert_eq!(
        send(&app, request("GET", "/tenant?org=Acme", None, &[]))
            .await
            .body,
        "acme"
    );
    assert_eq!(
        send(&app, request("GET", "/tenant", None, &[])).await.body,
        "default"
    );
    let reply = send(&app, request("GET", "/tenant?org=a:b", None, &[])).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.starts_with("the request names no valid tenant"));
}

#[tokio::test]
async fn works_alone_and_outside_axum() {
    // No session layer: the tenant layer alone.
    let app = Router::new()
        .route("/tenant", get(|t: Tenant| async move { t.to_string() }))
        .layer(TenantLayer::new(HostSubdomain::first_label()));
    assert_eq!(tenant_of(&app, Some(b"acme.localhost")).await, ok("acme"));

    // A plain Tower service with its own body types, as under hyper.
    let service = tower::ServiceBuilder::new()
        .layer(TenantLayer::new(HeaderTenant::new(x_tenant())).with_default_tenant(None))
        .service_fn(|request: Request<String>| async move {
            let tenant = request.extensions().get::<Tenant>().unwrap().to_string();
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                tenant,
            ))))
        });
    let request = |tenant: &'static str| {
        Request::builder()
            .header("x-tenant", tenant)
            .body(String::new())
            .unwrap()
    };
    let read = |response: Response<_>| async move {
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, body)
    };
    let response = service.clone().oneshot(request("Acme")).await.unwrap();
    assert_eq!(read(response).await, (StatusCode::OK, Bytes::from("acme")));
    let response = service.clone().oneshot(request("a:b")).await.unwrap();
    assert_eq!(read(response).await.0, StatusCode::BAD_REQUEST);
    let response = service.oneshot(Request::new(String::new())).await.unwrap();
    assert_eq!(
        read(response).await,
        (
            StatusCode::BAD_REQUEST,
            Bytes::from("the x-tenant header names no tenant\n")
        )
    );
}

#[tokio::test]
async fn the_extractor_needs_the_layer() {
    let bare = routes().layer(SessionLayer::new(MemoryStore::new()));
    let reply = get_on(&bare, "acme.localhost", "/tenant").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(reply.body.contains("TenantLayer"), "{reply:?}");
    assert_eq!(
        get_on(&bare, "acme.localhost", "/maybe-tenant").await.body,
        "None"
    );
    let app = app(TenantLayer::new(HostSubdomain::first_label()));
    assert_eq!(
        get_on(&app, "acme.localhost", "/maybe-tenant").await.body,
        "Some(Tenant(\"acme\"))"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals.

#[tokio::test]
async fn refusals_are_400_404_or_custom_with_the_reason_in_extensions() {
    let hostile = || request("GET", "/bump", Some(b"a_b.localhost"), &[]);

    let default = app(TenantLayer::new(HostSubdomain::first_label()));
    let response = response(&default, hostile()).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );
    assert!(response.headers().get(header::SET_COOKIE).is_none());
    assert!(matches!(
        response.extensions().get::<TenantRejected>(),
        Some(TenantRejected::Invalid {
            origin: TenantSource::Host,
            ..
        })
    ));

    let not_found = app(TenantLayer::new(HostSubdomain::first_label())
        .with_default_tenant(None)
        .with_rejection_status(StatusCode::NOT_FOUND));
    let response = self::response(&not_found, hostile()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = self::response(
        &not_found,
        request("GET", "/tenant", Some(b"localhost"), &[]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.extensions().get::<TenantRejected>(),
        Some(&TenantRejected::Missing(TenantSource::Host))
    );

    let custom = app(
        TenantLayer::new(HostSubdomain::first_label()).with_rejection(
            |rejected: &TenantRejected| {
                let status = match rejected {
                    TenantRejected::Missing(_) => StatusCode::MISDIRECTED_REQUEST,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Bytes::from(format!("{{\"error\":\"{rejected}\"}}")))
                    .unwrap()
            },
        ),
    );
    let response = self::response(&custom, hostile()).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert!(response.extensions().get::<TenantRejected>().is_some());
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    assert!(body.starts_with(b"{\"error\":\"the Host header names no valid tenant"));
}

#[tokio::test]
async fn the_layer_resolves_on_its_own() {
    let layer = TenantLayer::new(HostSubdomain::first_label());
    let acme = request("GET", "/", Some(b"Acme.localhost"), &[]);
    assert_eq!(layer.resolve(&acme).unwrap().as_str(), "acme");
    let bad = request("GET", "/", Some(b"a_b.localhost"), &[]);
    assert!(matches!(
        layer.resolve(&bad),
        Err(TenantRejected::Invalid { .. })
    ));
    assert!(format!("{layer:?}").contains("HostSubdomain"));
}

// ---------------------------------------------------------------------------------------------
// Isolation, against real stores.

/// Hostile tenant candidates, as a `Host` label or a header value: each must be refused or
/// normalised (upper case only), and never reach a key as given.
fn hostile_candidates() -> Vec<Vec<u8>> {
    let mut candidates: Vec<Vec<u8>> = [
        "a:b",
        "acme:session:x",
        "{acme}",
        "a{b}c",
        "*",
        "a*",
        "a?b",
        "[ab]",
        "a b",
        " acme",
        "ACME",
        "Globex-2",
        "-acme",
        "acme-",
        "a_b",
        "a/b",
        "a\\b",
        "a%3Ab",
        "a\tb",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    candidates.push("ümlaut".as_bytes().to_vec());
    candidates.push("xn--mlaut-jva\u{200b}".as_bytes().to_vec());
    candidates.push(vec![b'a'; 64]);
    candidates.push(vec![b'a'; 300]);
    candidates.push(Vec::new());
    candidates
}

/// A well-formed key: `turnstile:{tenant}:{session|user}:{43 base64url characters}`.
fn well_formed(key: &str, tenants: &[&str]) -> bool {
    let parts: Vec<&str> = key.split(':').collect();
    matches!(
        parts.as_slice(),
        ["turnstile", tenant, "session" | "user", hash]
            if tenants.contains(tenant)
                && hash.len() == 43
                && hash.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    )
}

fn keys(server: &RedisServer) -> Vec<String> {
    let mut keys: Vec<String> = server
        .cli(&["--scan"])
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenant_names_never_reach_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let by_host = app_with(
        TenantLayer::new(HostSubdomain::first_label()),
        redis_sessions(&server),
    );
    let by_header = app_with(
        TenantLayer::new(HeaderTenant::new(x_tenant())),
        redis_sessions(&server),
    );
    let by_path = Router::new().fallback_service(
        TenantLayer::new(PathPrefix::new("/t").unwrap().with_strip_prefix(true))
            .layer(routes().layer(redis_sessions(&server))),
    );
    let monitor = server.monitor();

    let mut accepted = Vec::new();
    for candidate in hostile_candidates() {
        let mut host = candidate.clone();
        host.extend_from_slice(b".localhost:3000");
        let mut sent = Vec::new();
        if HeaderValue::from_bytes(&host).is_ok() {
            sent.push(send(&by_host, request("POST", "/bump", Some(&host), &[])).await);
        }
        if HeaderValue::from_bytes(&candidate).is_ok() {
            let headers = [("x-tenant", candidate.as_slice())];
            let req = request("POST", "/bump", Some(b"localhost"), &headers);
            sent.push(send(&by_header, req).await);
        }
        let text = String::from_utf8_lossy(&candidate);
        let path = format!("/t/{}/bump", urlencode(&candidate));
        if path.parse::<Uri>().is_ok() {
            sent.push(send(&by_path, request("POST", &path, Some(b"localhost"), &[])).await);
        }
        assert!(!sent.is_empty(), "{text:?} was not sent at all");
        for reply in sent {
            match reply.status {
                StatusCode::OK => accepted.push(text.to_string()),
                StatusCode::BAD_REQUEST => assert!(
                    reply.set_cookies().is_empty(),
                    "{text:?}: a refusal set a cookie"
                ),
                other => panic!("{text:?}: {other} {reply:?}"),
            }
        }
    }
    // Only upper case is normalised; everything else was refused.
    accepted.sort();
    accepted.dedup();
    assert_eq!(accepted, ["ACME", "Globex-2"]);

    // Redis saw the accepted requests only, under the normalised names.
    let commands = monitor.take().join("\n");
    for candidate in hostile_candidates() {
        let text = String::from_utf8_lossy(&candidate);
        if !text.is_empty() && text != "ACME" && text != "Globex-2" {
            // Followed by the separator: `acme:session:x` must not match a well-formed
            // `turnstile:acme:session:x…` whose hash happens to start with `x`.
            assert!(
                !commands.contains(&format!("turnstile:{text}:")),
                "{text:?} reached Redis: {commands}"
            );
        }
    }
    assert!(!commands.contains("turnstile:ACME") && !commands.contains("turnstile:Globex"));

    let keys = keys(&server);
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(
            well_formed(key, &["acme", "globex-2"]),
            "ill-formed key {key:?}"
        );
    }
    assert!(
        keys.iter()
            .any(|k| k.starts_with("turnstile:acme:session:"))
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("turnstile:globex-2:session:"))
    );
}

/// Percent-encodes everything but unreserved characters, so any candidate fits in a path.
fn urlencode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_cannot_override_the_host() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = app_with(
        TenantLayer::new(HostSubdomain::first_label()),
        redis_sessions(&server),
    );
    let spoof = [
        ("x-tenant", &b"globex"[..]),
        ("x-forwarded-host", b"globex.localhost"),
    ];
    let reply = send(
        &app,
        request("GET", "/tenant", Some(b"acme.localhost"), &spoof),
    )
    .await;
    assert_eq!(reply.body, "acme");

    let reply = send(
        &app,
        request("POST", "/bump", Some(b"acme.localhost"), &spoof),
    )
    .await;
    assert_eq!(reply.body, "1");
    let mut acme = Client::new(app.clone());
    acme.host = Some("acme.localhost".into());
    acme.cookie = Some(reply.set_cookies()[0].split(';').next().unwrap().to_owned());
    // The session lives in acme, whatever the headers said.
    assert_eq!(acme.get("/count").await.body, "1");
    let keys = keys(&server);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("turnstile:acme:session:"), "{keys:?}");
    // The acme cookie on globex, with headers claiming acme: nothing.
    let cookie = acme.cookie.clone().unwrap();
    let reply = send(
        &app,
        request(
            "GET",
            "/count",
            Some(b"globex.localhost"),
            &[("x-tenant", b"acme"), ("cookie", cookie.as_bytes())],
        ),
    )
    .await;
    assert_eq!(reply.body, "0");
}

async fn a_cookie_replayed_on_another_tenant_finds_nothing(sessions: SessionLayer) {
    let app = app_with(TenantLayer::new(HostSubdomain::first_label()), sessions);
    let mut acme = Client::new(app);
    acme.host = Some("acme.localhost:3000".into());
    acme.post("/bump").await;
    assert_eq!(acme.post("/bump").await.body, "2");
    acme.post("/login/alice").await;
    assert_eq!(acme.get("/user").await.body, "alice");

    for other in [
        "globex.localhost:3000",
        "localhost:3000",
        "127.0.0.1",
        "[::1]:3000",
    ] {
        let mut replay = acme.clone();
        replay.host = Some(other.into());
        let reply = replay.get("/count").await;
        assert_eq!(reply.body, "0", "{other}");
        assert!(reply.set_cookies().is_empty(), "{other}: {reply:?}");
        assert_eq!(replay.get("/user").await.body, "anonymous", "{other}");
        assert_eq!(replay.get("/sessions").await.body, "0", "{other}");
        assert_eq!(replay.post("/logout-all").await.body, "0", "{other}");
        // Writing under the replayed cookie starts a new session elsewhere; acme's is intact.
        assert_eq!(replay.post("/bump").await.body, "1", "{other}");
    }
    // Upper case names the same tenant.
    let mut upper = acme.clone();
    upper.host = Some("ACME.localhost".into());
    assert_eq!(upper.get("/count").await.body, "2");
    assert_eq!(acme.get("/user").await.body, "alice");
    assert_eq!(acme.get("/sessions").await.body, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_cookie_replayed_on_another_tenant_finds_nothing() {
    a_cookie_replayed_on_another_tenant_finds_nothing(SessionLayer::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_cookie_replayed_on_another_tenant_finds_nothing() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    a_cookie_replayed_on_another_tenant_finds_nothing(redis_sessions(&server)).await;
    // The acme session and user index, plus the sessions the replays started fresh.
    let keys = keys(&server);
    for key in &keys {
        assert!(well_formed(key, &["acme", "globex", "default"]), "{key:?}");
    }
    let user_keys: Vec<&String> = keys.iter().filter(|k| k.contains(":user:")).collect();
    assert_eq!(user_keys.len(), 1, "{keys:?}");
    assert!(user_keys[0].starts_with("turnstile:acme:user:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_same_user_name_in_two_tenants_is_two_users() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let app = app_with(
        TenantLayer::new(HostSubdomain::first_label()),
        redis_sessions(&server),
    );
    let login = |host: &str| {
        let mut client = Client::new(app.clone());
        client.host = Some(host.into());
        async move {
            client.post("/bump").await;
            client.post("/login/alice").await;
            client
        }
    };
    let mut acme_laptop = login("acme.localhost").await;
    let mut acme_phone = login("acme.localhost:3000").await;
    let mut globex = login("globex.localhost").await;

    // Separate indexes.
    assert_eq!(acme_laptop.get("/sessions").await.body, "2");
    assert_eq!(globex.get("/sessions").await.body, "1");
    let user_keys: Vec<String> = keys(&server)
        .into_iter()
        .filter(|k| k.contains(":user:"))
        .collect();
    assert_eq!(user_keys.len(), 2, "{user_keys:?}");
    assert!(user_keys[0].starts_with("turnstile:acme:user:"));
    assert!(user_keys[1].starts_with("turnstile:globex:user:"));
    // Same user name, same hash: only the tenant tells them apart.
    assert_eq!(
        user_keys[0].rsplit(':').next(),
        user_keys[1].rsplit(':').next()
    );

    // "Log out everywhere" for alice@acme never touches alice@globex.
    assert_eq!(acme_phone.post("/logout-all").await.body, "2");
    assert_eq!(acme_laptop.get("/user").await.body, "anonymous");
    assert_eq!(acme_phone.get("/user").await.body, "anonymous");
    assert_eq!(globex.get("/user").await.body, "alice");
    assert_eq!(globex.get("/count").await.body, "1");
    assert_eq!(globex.get("/sessions").await.body, "1");

    // And the other way round.
    let mut acme_again = login("acme.localhost").await;
    assert_eq!(globex.post("/logout-all").await.body, "1");
    assert_eq!(globex.get("/user").await.body, "anonymous");
    assert_eq!(acme_again.get("/user").await.body, "alice");
    assert_eq!(acme_again.get("/sessions").await.body, "1");
}

/// Every layer's response future answers the same when polled again after it completed: a
/// plain `500`, without polling the inner service's future again.
#[tokio::test]
async fn response_futures_polled_after_completion_answer_500_on_every_layer() {
    use std::{future::Future, pin::pin, task::Context};

    use axum::body::Body;
    use tower::{Service, ServiceExt};
    use tower_turnstile::{
        ratelimit::{Policy, Quota, RateLimitLayer},
        session::{MemoryStore, SessionLayer},
        tenant::{HostSubdomain, TenantLayer},
    };

    async fn twice<S>(mut service: S, request: http::Request<Body>)
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>,
        S::Error: std::fmt::Debug,
    {
        let service = service.ready().await.unwrap();
        let mut future = pin!(service.call(request));
        let first = std::future::poll_fn(|cx| future.as_mut().poll(cx))
            .await
            .unwrap();
        assert_ne!(first.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        let waker = std::task::Waker::noop();
        let again = match future.as_mut().poll(&mut Context::from_waker(waker)) {
            std::task::Poll::Ready(response) => response.unwrap(),
            std::task::Poll::Pending => panic!("a completed future answers at once"),
        };
        assert_eq!(again.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(again.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"response future polled after completion\n");
    }

    let handler = tower::service_fn(|_: http::Request<Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("ok")))
    });
    let request = || {
        http::Request::builder()
            .uri("/")
            .header(http::header::HOST, "acme.example.com")
            .body(Body::empty())
            .unwrap()
    };
    let tenants = TenantLayer::new(HostSubdomain::from_static("example.com"));
    twice(tower::Layer::layer(&tenants, handler), request()).await;
    // A refusal, answered by the layer itself.
    let bad_host = http::Request::builder()
        .uri("/")
        .header(http::header::HOST, "bad_label.example.com")
        .body(Body::empty())
        .unwrap();
    twice(tower::Layer::layer(&tenants, handler), bad_host).await;
    let sessions = SessionLayer::new(MemoryStore::new());
    twice(tower::Layer::layer(&sessions, handler), request()).await;
    let limits = RateLimitLayer::new(Policy::from_static("all", Quota::per_minute(10)));
    twice(tower::Layer::layer(&limits, handler), request()).await;
}
