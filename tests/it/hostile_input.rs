//! Hostile input, as properties: the parsers that read what clients send (cookies, forwarding
//! headers, hosts, paths, tenant headers) are driven with generated input through the public
//! layers, and each property says what must hold, not only that nothing panics.
//!
//! These are proptest harnesses, which run on the stable toolchain this project builds with
//! (`cargo fuzz` needs nightly). `HOSTILE_CASES` sets the number of cases per property
//! (default 256: a few seconds each); a long run is
//! `HOSTILE_CASES=100000 cargo test --release --test it hostile_input`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::{Router, body::Body, routing::get};
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use tower::ServiceExt;
use tower_turnstile::{
    RequestView,
    ratelimit::{ClientIp, KeyExtractor},
    session::{MemoryStore, SessionLayer, SigningKey},
    tenant::{HeaderTenant, HostSubdomain, PathPrefix, Tenant, TenantLayer},
};

use crate::support::{http::send, session_app::app};

fn runner() -> TestRunner {
    let cases = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Any bytes a client could put in a header value (visible ASCII, spaces, tabs, and the
/// bytes above 0x7f that `HeaderValue` accepts).
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => 0x20u8..0x7f,
            1 => Just(b'\t'),
            1 => 0x80u8..=0xff,
            2 => prop::sample::select(b";=,\" %{}".to_vec()),
        ],
        0..max,
    )
}

// ---------------------------------------------------------------------------------------------
// Cookies → session id

/// Whatever the `Cookie` header holds, the layer answers without a server error and the handler
/// sees no session: only an id the layer itself issued finds one.
#[test]
fn no_cookie_header_finds_a_session_it_was_not_given() {
    let rt = runtime();
    let app = app(SessionLayer::new(MemoryStore::new()).with_secure(false));
    let mut runner = runner();
    runner
        .run(&header_bytes(600), |bytes| {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            let reply = rt.block_on(async {
                let request = Request::get("/get/k")
                    .header(header::COOKIE, value)
                    .body(Body::empty())
                    .unwrap();
                send(&app, request).await
            });
            prop_assert_eq!(reply.status, StatusCode::OK);
            prop_assert_eq!(reply.body.as_str(), "none");
            Ok(())
        })
        .unwrap();
}

/// A genuine signed cookie, altered in any way (truncated, a character changed, text added,
/// or signed with a key the layer does not hold), never yields the session; the previous key
/// of a rotation still does.
#[test]
fn an_altered_signed_cookie_never_yields_the_session() {
    let rt = runtime();
    let store = MemoryStore::new();
    let current = SigningKey::from_secret("the current secret of every instance").unwrap();
    let previous = SigningKey::from_secret("the secret before the rotation").unwrap();
    let layer = |key: SigningKey| {
        SessionLayer::new(store.clone())
            .with_secure(false)
            .with_signing_key(key)
    };
    let signed_by = |key: SigningKey| -> String {
        rt.block_on(async {
            let app = app(layer(key));
            let reply = send(&app, Request::post("/set/k/v").body(Body::empty()).unwrap()).await;
            let set = reply.set_cookie().expect("a session cookie");
            set.split(';').next().unwrap().to_owned()
        })
    };
    let genuine = signed_by(current.clone());
    let old = signed_by(previous.clone());
    let stranger = signed_by(SigningKey::from_secret("a key nobody configured").unwrap());
    let checking = app(layer(current).with_previous_signing_key(previous));
    let read = |cookie: &str| -> String {
        rt.block_on(async {
            let request = Request::get("/get/k")
                .header(header::COOKIE, cookie)
                .body(Body::empty())
                .unwrap();
            send(&checking, request).await.body
        })
    };
    assert_eq!(read(&genuine), "\"v\"");
    assert_eq!(read(&old), "\"v\"", "the previous key still verifies");
    assert_eq!(read(&stranger), "none", "an unknown key does not");

    let (name, value) = genuine.split_once('=').unwrap();
    let (name, value) = (name.to_owned(), value.to_owned());
    // Inserted text has no `;` or space: those would split the header into the genuine cookie
    // and another one, which is no alteration of the cookie.
    let alterations = (0..value.len(), any::<u8>(), 0usize..3, "[!-:<-~]{1,8}");
    let mut runner = runner();
    runner
        .run(&alterations, |(at, byte, how, extra)| {
            let mut altered = value.clone().into_bytes();
            match how {
                0 => altered.truncate(at),
                1 => altered[at] = b' ' + byte % 95,
                _ => altered.splice(at..at, extra.bytes()).for_each(drop),
            }
            let Ok(altered) = String::from_utf8(altered) else {
                return Ok(());
            };
            if altered == value {
                return Ok(());
            }
            let body = read(&format!("{name}={altered}"));
            prop_assert_eq!(body.as_str(), "none", "{} was accepted", altered);
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Forwarding headers + trusted proxies → client key

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    // Few enough distinct addresses that chains share hops with the trusted set.
    (prop::sample::select(vec![10u8, 192, 203]), 0u8..4, 0u8..4)
        .prop_map(|(a, c, d)| Ipv4Addr::new(a, if a == 192 { 168 } else { 0 }, c, d))
}

fn key_of(
    extractor: &ClientIp,
    peer: Ipv4Addr,
    headers: &[(HeaderName, String)],
) -> Option<String> {
    let mut request = Request::get("/").body(()).unwrap();
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            request.headers_mut().append(name.clone(), value);
        }
    }
    request
        .extensions_mut()
        .insert(SocketAddr::new(IpAddr::V4(peer), 40000));
    let key = extractor.extract(&RequestView::new(&request)).now();
    key.expect("ClientIp decides at once")
        .map(|key| key.to_string())
}

/// The key is the right-most address of the chain (peer last) that is not a trusted proxy, or
/// the left-most one when all are trusted: so what a client writes to the left of the first
/// untrusted hop (a forged chain) never changes its key.
#[test]
fn a_client_never_chooses_its_own_key() {
    let trusted_nets = ["10.0.0.0/8", "192.168.0.0/16"];
    let extractor = ClientIp::trusting(trusted_nets).unwrap();
    let trusted = |ip: &Ipv4Addr| ip.octets()[0] == 10 || ip.octets()[0] == 192;
    let chains = (
        proptest::collection::vec(ipv4(), 0..6),
        proptest::collection::vec(ipv4(), 0..4),
        ipv4(),
        any::<bool>(),
    );
    let mut runner = runner();
    runner
        .run(&chains, |(hops, forged, peer, forwarded_syntax)| {
            let render = |chain: &[Ipv4Addr]| -> (HeaderName, String) {
                if forwarded_syntax {
                    let parts: Vec<String> = chain.iter().map(|ip| format!("for={ip}")).collect();
                    (header::FORWARDED, parts.join(", "))
                } else {
                    let parts: Vec<String> = chain.iter().map(Ipv4Addr::to_string).collect();
                    (HeaderName::from_static("x-forwarded-for"), parts.join(", "))
                }
            };
            let headers = if hops.is_empty() {
                vec![]
            } else {
                vec![render(&hops)]
            };
            let key = key_of(&extractor, peer, &headers);

            // The model: walk from the peer leftwards through the chain while hops are trusted.
            let mut path: Vec<Ipv4Addr> = hops.clone();
            path.push(peer);
            let expected = if !trusted(&peer) {
                peer
            } else {
                *path
                    .iter()
                    .rev()
                    .find(|ip| !trusted(ip))
                    .unwrap_or(&path[0])
            };
            prop_assert_eq!(key.clone(), Some(expected.to_string()));

            // Forged hops on the left change nothing once an untrusted hop stands right of them.
            if path.iter().any(|ip| !trusted(ip)) {
                let mut longer = forged.clone();
                longer.extend(&hops);
                let headers = if longer.is_empty() {
                    vec![]
                } else {
                    vec![render(&longer)]
                };
                prop_assert_eq!(key_of(&extractor, peer, &headers), key);
            }
            Ok(())
        })
        .unwrap();
}

/// Garbage in the forwarding headers never makes a key out of thin air: the key is the peer or
/// an address that was written in the header.
#[test]
fn garbage_forwarding_headers_fall_back_to_a_real_hop() {
    let extractor = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
    let peer = Ipv4Addr::new(10, 0, 0, 1);
    let mut runner = runner();
    runner
        .run(
            &(header_bytes(200), header_bytes(200)),
            |(xff, forwarded)| {
                let headers = vec![
                    (
                        HeaderName::from_static("x-forwarded-for"),
                        String::from_utf8_lossy(&xff).into_owned(),
                    ),
                    (
                        header::FORWARDED,
                        String::from_utf8_lossy(&forwarded).into_owned(),
                    ),
                ];
                let key = key_of(&extractor, peer, &headers).expect("a key");
                let written = format!(
                    "{} {}",
                    String::from_utf8_lossy(&xff),
                    String::from_utf8_lossy(&forwarded)
                );
                let address: IpAddr = key.parse().expect("the key is an address");
                prop_assert!(
                    key == peer.to_string() || written.contains(&key) || address.is_ipv6(),
                    "{} from {:?}",
                    key,
                    written
                );
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Host / path / header → tenant

/// What a resolved tenant must look like: a lower-case DNS label.
fn is_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && Tenant::new(name).is_ok_and(|t| t.as_str() == name)
}

/// Serves `/` behind `layer`, answering the tenant the handler saw.
fn tenant_app(layer: TenantLayer) -> Router {
    Router::new()
        .fallback(get(|tenant: axum::Extension<Tenant>| async move {
            tenant.0.as_str().to_owned()
        }))
        .layer(layer)
}

/// Tenant-ish text: mostly near-valid labels (letters of both cases, digits, `-`, `_`, dots,
/// lengths around the 63-byte limit), sometimes any bytes at all.
fn tenant_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => "[a-z0-9-]{0,70}".prop_map(String::into_bytes),
        2 => "[a-zA-Z0-9_-]{0,70}(\\.[a-z0-9-]{0,10}){0,3}(:[0-9]{1,5})?".prop_map(String::into_bytes),
        1 => header_bytes(120),
    ]
}

fn tenant_property(layer: TenantLayer, request: impl Fn(&[u8]) -> Option<Request<Body>>) {
    let rt = runtime();
    let app = tenant_app(layer);
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let mut runner = runner();
    runner
        .run(&tenant_text(), |bytes| {
            let Some(request) = request(&bytes) else {
                return Ok(());
            };
            let (status, body) = rt.block_on(async {
                let response = app.clone().oneshot(request).await.unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            });
            prop_assert!(
                status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
                "{}",
                status
            );
            if status == StatusCode::OK {
                prop_assert!(is_tenant_name(&body), "{:?} reached the handler", body);
                accepted.set(accepted.get() + 1);
            } else {
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // Both answers were exercised, or the property proved little.
    assert!(
        accepted.get() > 0 && refused.get() > 0,
        "accepted {}, refused {}",
        accepted.get(),
        refused.get()
    );
}

#[test]
fn any_host_gives_a_valid_tenant_or_a_400() {
    tenant_property(TenantLayer::new(HostSubdomain::first_label()), |bytes| {
        let value = HeaderValue::from_bytes(bytes).ok()?;
        Request::get("/")
            .header(header::HOST, value)
            .body(Body::empty())
            .ok()
    });
}

#[test]
fn any_path_gives_a_valid_tenant_or_a_400() {
    tenant_property(TenantLayer::new(PathPrefix::new("/t").unwrap()), |bytes| {
        let path: String = bytes
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '%' })
            .collect();
        Request::get(format!("/t/{path}")).body(Body::empty()).ok()
    });
}

#[test]
fn any_tenant_header_gives_a_valid_tenant_or_a_400() {
    tenant_property(
        TenantLayer::new(HeaderTenant::new(HeaderName::from_static("x-tenant"))),
        |bytes| {
            let value = HeaderValue::from_bytes(bytes).ok()?;
            Request::get("/")
                .header("x-tenant", value)
                .body(Body::empty())
                .ok()
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Session records read back from Redis

/// One metadata or data field of a stored session hash, as a corrupted or foreign writer could
/// leave it.
fn field_value(kind: u8) -> BoxedStrategy<String> {
    let hour_ms = 3_600_000u64;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    match kind {
        // m:created
        0 => prop_oneof![4 => Just(now_ms.to_string()), 1 => "[ -~]{0,12}"].boxed(),
        // m:abs: well in the future, well in the past, or garbage
        1 => prop_oneof![
            4 => Just((now_ms + hour_ms).to_string()),
            1 => Just((now_ms - hour_ms).to_string()),
            1 => "[ -~]{0,12}"
        ]
        .boxed(),
        // m:idle: none, some, or garbage
        2 => prop_oneof![
            1 => Just("0".to_owned()),
            4 => Just("60000".to_owned()),
            1 => "[ -~]{0,8}"
        ]
        .boxed(),
        // m:tenant
        3 => prop_oneof![4 => Just("default".to_owned()), 1 => Just("acme".to_owned())].boxed(),
        // d:*: JSON or not
        _ => prop_oneof![
            3 => Just("\"text\"".to_owned()),
            3 => Just("42".to_owned()),
            3 => Just("{\"a\":[1,2]}".to_owned()),
            1 => "[ -~]{0,16}"
        ]
        .boxed(),
    }
}

/// A stored hash: each metadata field present or not, some data fields, some stray fields.
fn stored_hash() -> impl Strategy<Value = Vec<(String, String)>> {
    let meta = [
        ("m:created", 0u8),
        ("m:abs", 1),
        ("m:idle", 2),
        ("m:tenant", 3),
    ];
    let metadata: Vec<BoxedStrategy<Option<(String, String)>>> = meta
        .iter()
        .map(|&(name, kind)| {
            prop::option::weighted(
                0.9,
                field_value(kind).prop_map(move |v| (name.to_owned(), v)),
            )
            .boxed()
        })
        .collect();
    let data = proptest::collection::vec(("[a-z]{1,6}", field_value(9)), 0..4).prop_map(|fields| {
        fields
            .into_iter()
            .map(|(name, value)| (format!("d:{name}"), value))
            .collect::<Vec<_>>()
    });
    let stray = proptest::collection::vec(("[a-z:]{1,8}", "[ -~]{0,8}"), 0..2);
    (metadata, data, stray).prop_map(|(metadata, data, stray)| {
        let mut fields: Vec<(String, String)> = metadata.into_iter().flatten().collect();
        fields.extend(data);
        fields.extend(
            stray
                .into_iter()
                .filter(|(n, _)| !n.starts_with("m:") && !n.starts_with("d:")),
        );
        fields
    })
}

/// Whatever a session's hash holds, a load answers (never an error, never a panic): the
/// session when its metadata is whole, its tenant the key's, its values JSON and its life not
/// over; otherwise no session, and a hash that is no live session of this tenant is removed.
#[test]
fn any_stored_hash_loads_as_a_session_or_as_none() {
    use tower_turnstile::{
        backend::RedisBackend,
        session::{RedisStore, SessionKey, SessionStore},
    };
    let Some(server) = crate::support::RedisServer::start() else {
        return;
    };
    let rt = runtime();
    let (store, connection) = rt.block_on(async {
        let backend = RedisBackend::new(&server.url()).unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        (
            RedisStore::new(backend).with_key_prefix("h:"),
            client.get_multiplexed_async_connection().await.unwrap(),
        )
    });
    let tenant = Tenant::default();
    let counter = std::cell::Cell::new(0u64);
    let (served, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let mut runner = runner();
    runner
        .run(&stored_hash(), |fields| {
            if fields.is_empty() {
                return Ok(());
            }
            let mut connection = connection.clone();
            let n = counter.get();
            counter.set(n + 1);
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&n.to_be_bytes());
            let hash =
                base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
            let key = SessionKey::from_hash(&tenant, &hash).expect("a valid hash");
            let redis_key = format!("h:{tenant}:session:{hash}");
            let loaded = rt.block_on(async {
                let mut hset = redis::cmd("HSET");
                hset.arg(&redis_key);
                for (name, value) in &fields {
                    hset.arg(name).arg(value);
                }
                let _: () = hset.query_async(&mut connection).await.unwrap();
                let _: () = redis::cmd("PEXPIRE")
                    .arg(&redis_key)
                    .arg(60_000)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                store.load(&key).await
            });
            // What Redis holds: a field written twice keeps its last value.
            let stored: std::collections::BTreeMap<&str, &str> = fields
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let get = |name: &str| stored.get(name).copied();
            let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
            let json_ok = stored
                .iter()
                .filter(|(n, _)| n.starts_with("d:"))
                .all(|(_, v)| serde_json::from_str::<serde::de::IgnoredAny>(v).is_ok());
            let whole = number("m:created").is_some()
                && number("m:abs").is_some()
                && number("m:idle").is_some()
                && get("m:tenant").is_some()
                && json_ok;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let alive = number("m:abs").is_some_and(|abs| abs > now_ms)
                && number("m:idle").is_some_and(|idle| idle > 0);
            let ours = get("m:tenant") == Some("default");
            let loaded = loaded.map_err(|e| TestCaseError::fail(format!("load failed: {e:?}")))?;
            let exists = rt.block_on(async {
                redis::cmd("EXISTS")
                    .arg(&redis_key)
                    .query_async::<i64>(&mut connection)
                    .await
                    .unwrap()
            });
            match loaded {
                Some(record) => {
                    served.set(served.get() + 1);
                    prop_assert!(whole && alive && ours, "served: {:?}", fields);
                    let data: Vec<&String> = record.data.keys().collect();
                    let expected: Vec<String> = stored
                        .keys()
                        .filter_map(|n| n.strip_prefix("d:").map(str::to_owned))
                        .collect();
                    prop_assert_eq!(data, expected.iter().collect::<Vec<_>>());
                }
                None => {
                    refused.set(refused.get() + 1);
                    prop_assert!(
                        !(whole && alive && ours),
                        "refused a live session: {:?}",
                        fields
                    );
                    if whole && !ours {
                        prop_assert_eq!(exists, 1, "another tenant's record is left alone");
                    } else {
                        prop_assert_eq!(exists, 0, "not a live session, removed: {:?}", fields);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "stored hashes: served {}, refused {}",
        served.get(),
        refused.get()
    );
    assert!(
        served.get() > 0 && refused.get() > 0,
        "served {}, refused {}",
        served.get(),
        refused.get()
    );
}
