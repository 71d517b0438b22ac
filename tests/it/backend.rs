//! The shared Redis backend: connection, breaker and health against a real Redis.

use std::time::Duration;

use axum::{Router, body::Body};
use http::{Request, StatusCode};
use tower_turnstile::{
    ConfigError,
    backend::{BackendError, BreakerConfig, BreakerState, RedisBackend},
    health::HealthService,
};

use crate::support::{RedisServer, http::send};

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    assert!(matches!(
        RedisBackend::new("redis://127.0.0.1:1"),
        Err(ConfigError::NoRuntime(_))
    ));
}

#[tokio::test]
async fn an_invalid_url_is_a_typed_error() {
    for url in ["", "http://example", "redis://:::::"] {
        let error = RedisBackend::new(url).expect_err(url);
        assert!(
            matches!(error, ConfigError::RedisUrl { .. }),
            "{url}: {error:?}"
        );
    }
}

#[tokio::test]
async fn it_starts_while_redis_is_down_and_connects_when_it_is_up() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    server.stop();
    let backend = RedisBackend::builder(server.url())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(1)
                .open_for(Duration::from_millis(50)),
        )
        .build()
        .expect("building needs no Redis");
    let error = backend.ping().await.expect_err("Redis is down");
    assert!(error.is_outage(), "{error:?}");
    assert_eq!(backend.status().state, BreakerState::Open);
    assert!(
        matches!(backend.ping().await, Err(BackendError::CircuitOpen)),
        "open: fail fast"
    );

    server.restart();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let mut healthy = false;
    for _ in 0..50 {
        if backend.check().await.healthy {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(
        healthy,
        "the probe closed the breaker: {:?}",
        backend.status()
    );
    backend.ping().await.unwrap();
    let snapshot = backend.status();
    assert_eq!(snapshot.state, BreakerState::Closed);
    assert!(
        snapshot.last_error.is_some(),
        "the last outage stays on record"
    );
    assert!(snapshot.failures >= 1 && snapshot.successes >= 1 && snapshot.rejected >= 1);
}

#[tokio::test]
async fn clones_share_one_breaker() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let a = RedisBackend::builder(server.url())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(2)
                .open_for(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let b = a.clone();
    a.ping().await.unwrap();
    server.stop();
    assert!(a.ping().await.is_err());
    assert!(b.ping().await.is_err());
    assert!(matches!(b.ping().await, Err(BackendError::CircuitOpen)));
    assert!(matches!(a.ping().await, Err(BackendError::CircuitOpen)));
    assert_eq!(a.status().rejected, 2);
}

#[tokio::test]
async fn health_service_answers_json() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::builder(server.url())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(1)
                .open_for(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let app = Router::new().route_service("/health", HealthService::new(backend.clone()));
    let reply = send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["healthy"], true);
    assert_eq!(json["state"], "closed");
    assert_eq!(json["target"], format!("127.0.0.1:{}/0", server.port()));
    assert!(json["round_trips"].as_u64().unwrap() >= 1);

    assert_eq!(json["redis"], "healthy");
    assert_eq!(json["fallback_active"], false);

    server.stop();
    // Degraded, it still answers `200` by default (the JSON says what is wrong)...
    let reply = send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["healthy"], false);
    assert_eq!(json["redis"], "unhealthy");
    assert_eq!(json["state"], "open");
    assert_eq!(json["fallback_active"], true);
    assert!(json["last_error"].is_string());
    // ...and `503` for a probe that asks for it.
    let strict = Router::new().route_service(
        "/health",
        HealthService::new(backend.clone()).with_degraded_status(StatusCode::SERVICE_UNAVAILABLE),
    );
    let reply = send(
        &strict,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn credentials_never_show_in_health() {
    let backend = RedisBackend::new("redis://user:hunter2@127.0.0.1:1/3").unwrap();
    let snapshot = backend.status();
    assert_eq!(snapshot.target, "127.0.0.1:1/3");
    assert!(!format!("{backend:?}").contains("hunter2"));
}

#[tokio::test]
async fn passwords_and_acl_users_authenticate() {
    let Some(server) = RedisServer::start_with_password(
        "default-secret",
        &["--user", "app", "on", ">app-secret", "~*", "&*", "+@all"],
    ) else {
        return;
    };
    let port = server.port();
    for url in [
        format!("redis://:default-secret@127.0.0.1:{port}"),
        format!("redis://app:app-secret@127.0.0.1:{port}"),
    ] {
        let backend = RedisBackend::new(&url).unwrap();
        backend.ping().await.expect("authenticated");
        let shown = format!("{backend:?} {:?}", backend.status());
        assert!(!shown.contains("secret"), "{shown}");
    }
    // A wrong password is an outage (the server cannot be used), said without the password.
    let backend = RedisBackend::new(&format!("redis://app:wrong-secret@127.0.0.1:{port}")).unwrap();
    let error = backend.ping().await.unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    let snapshot = backend.status();
    let said = format!("{error} {:?}", snapshot.last_error);
    assert!(!said.contains("wrong-secret"), "{said}");
}

/// A certificate authority and a server certificate for `localhost` and 127.0.0.1 it signed,
/// made with `openssl` in `dir`.
fn make_certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=turnstile test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test]
async fn tls_with_the_roots_given() {
    let dir = std::env::temp_dir().join(format!("turnstile-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_certificates(&dir);
    let file = |name: &str| dir.join(name).display().to_string();
    let tls_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    // The plain port serves the harness's own checks; clients use the TLS one.
    let Some(server) = RedisServer::start_with_password(
        "tls-secret",
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &file("server.crt"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.crt"),
            "--tls-auth-clients",
            "no",
        ],
    ) else {
        return;
    };
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let url = format!("rediss://:tls-secret@127.0.0.1:{tls_port}");
    let backend = RedisBackend::builder(&url)
        .tls_root_certificates(ca)
        .build()
        .unwrap();
    backend.ping().await.expect("TLS with the given roots");
    let shown = format!("{backend:?} {:?}", backend.status());
    assert!(!shown.contains("tls-secret"), "{shown}");

    // The system's roots do not know this authority: no connection, an outage.
    let untrusted = RedisBackend::new(&url).unwrap();
    assert!(untrusted.ping().await.unwrap_err().is_outage());
    // Plain text to the TLS port is no connection either.
    let plain = RedisBackend::new(&format!("redis://:tls-secret@127.0.0.1:{tls_port}")).unwrap();
    assert!(plain.ping().await.unwrap_err().is_outage());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis set to evict keys under memory pressure is read from `INFO memory` (by a user whom
/// ACLs refuse `CONFIG`), shown in the health report, and no longer once the policy is fixed.
#[tokio::test]
async fn an_eviction_policy_is_reported_until_it_is_fixed() {
    let Some(server) = RedisServer::start_with_password(
        "admin-secret",
        &[
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--user",
            "app",
            "on",
            ">app-secret",
            "~*",
            "&*",
            "+@all",
            "-config",
        ],
    ) else {
        return;
    };
    let url = format!("redis://app:app-secret@127.0.0.1:{}", server.port());
    let backend = RedisBackend::new(&url).unwrap();
    assert_eq!(
        backend.memory_settings(),
        None,
        "nothing is read before a check"
    );
    let mut direct = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let refused: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut direct)
        .await;
    assert!(
        refused.is_err(),
        "the app user may not run CONFIG: {refused:?}"
    );

    let status = backend.check().await;
    assert!(status.healthy);
    let memory = status.memory.expect("read by the check");
    assert_eq!(memory.maxmemory, 64 * 1024 * 1024);
    assert_eq!(memory.policy, "allkeys-lru");
    assert_eq!(status.eviction_risk.as_deref(), Some("allkeys-lru"));

    let app = Router::new().route_service("/health", HealthService::new(backend.clone()));
    let reply = send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["eviction_risk"], "allkeys-lru");
    assert_eq!(json["memory"]["policy"], "allkeys-lru");
    assert_eq!(json["memory"]["maxmemory"], 64 * 1024 * 1024);

    server.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let status = backend.check().await;
    assert_eq!(status.eviction_risk, None);
    assert_eq!(
        status.memory.map(|m| m.policy).as_deref(),
        Some("noeviction")
    );
    let reply = send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert!(json.get("eviction_risk").is_none(), "{json}");
}

/// A Redis without a memory limit evicts nothing, whatever its policy says.
#[tokio::test]
async fn no_memory_limit_is_no_eviction_risk() {
    let Some(server) = RedisServer::start_with_args(
        false,
        vec!["--maxmemory-policy".to_owned(), "allkeys-lru".to_owned()],
    ) else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let status = backend.check().await;
    let memory = status.memory.expect("read by the check");
    assert_eq!(
        (memory.maxmemory, memory.policy.as_str()),
        (0, "allkeys-lru")
    );
    assert_eq!(status.eviction_risk, None);
}

/// Out of memory under `noeviction`, Redis refuses writes and serves reads: a refused write is
/// `Unavailable` with `WritesRefused` as its source, the breaker stays closed, and the status
/// says so until a check's probe write is taken again.
#[tokio::test]
async fn out_of_memory_refuses_writes_and_keeps_reads() {
    use tower_turnstile::{
        session::{Record, RedisStore, SessionKey, SessionStore},
        tenant::Tenant,
    };
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let store = RedisStore::new(backend.clone());
    let tenant = Tenant::from_static("acme");
    let key = |c: char| SessionKey::from_hash(&tenant, &c.to_string().repeat(43)).unwrap();
    let record = Record::new(Duration::from_secs(600), Duration::from_secs(3600));
    store.create(&key('A'), &record).await.unwrap();

    server.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let error = store.create(&key('E'), &record).await.unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    let source = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<BackendError>())
        .expect("the backend's error");
    assert!(source.refuses_writes() && !source.is_outage(), "{source:?}");
    assert_eq!(store.load(&key('A')).await.unwrap(), Some(record.clone()));
    let status = backend.status();
    assert!(status.healthy, "reads are served: {status:?}");
    assert_eq!(status.state, BreakerState::Closed);
    assert!(status.refusing_writes);
    assert_eq!(status.writes_refused, 1);
    assert!(
        status
            .last_write_refusal
            .as_deref()
            .unwrap()
            .contains("OOM"),
        "{status:?}"
    );
    // A check's probe write is refused too while memory is short...
    let status = backend.check().await;
    assert!(
        status.refusing_writes && status.writes_refused == 2,
        "{status:?}"
    );

    // ...and taken once it is not.
    server.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let status = backend.check().await;
    assert!(!status.refusing_writes, "{status:?}");
    store.create(&key('E'), &record).await.unwrap();
}

/// Redis busy running a script answers `BUSY` to everything: an outage (the breaker opens and
/// the stores fall back), over once the script is killed.
#[tokio::test]
async fn a_redis_busy_with_a_script_is_an_outage() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    server.cli(&["CONFIG", "SET", "busy-reply-threshold", "10"]);
    let backend = RedisBackend::builder(server.url())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(1)
                .open_for(Duration::from_millis(50)),
        )
        .build()
        .unwrap();
    backend.ping().await.expect("Redis answers");
    let mut script = std::process::Command::new("redis-cli")
        .args(["-p", &server.port().to_string()])
        .args(["EVAL", "while true do end", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli runs");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let error = backend.ping().await.unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    assert_eq!(backend.status().state, BreakerState::Open);
    assert!(
        backend.status().last_error.unwrap().contains("BUSY"),
        "{:?}",
        backend.status()
    );

    server.cli(&["SCRIPT", "KILL"]);
    script.wait().expect("the script ends");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while backend.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "Redis answers again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backend.status().healthy);
}

/// A replica refuses writes (`READONLY`, inside the store's transaction an `EXECABORT`), and a
/// replica cut off from its master that may not serve stale data refuses reads (`MASTERDOWN`):
/// both are outages, which the stores' callers fall back from.
#[tokio::test]
async fn readonly_and_masterdown_are_outages() {
    use tower_turnstile::{
        session::{Record, RedisStore, SessionKey, SessionStore},
        tenant::Tenant,
    };
    let Some(mut master) = RedisServer::start() else {
        return;
    };
    let Some(replica) = RedisServer::start_replica_of(&master) else {
        return;
    };
    let key = SessionKey::from_hash(&Tenant::from_static("acme"), &"A".repeat(43)).unwrap();
    let record = Record::new(Duration::from_secs(600), Duration::from_secs(3600));
    let backend = RedisBackend::new(&replica.url()).unwrap();
    let error = RedisStore::new(backend.clone())
        .create(&key, &record)
        .await
        .unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    let said = format!("{:?}", backend.status().last_error).to_uppercase();
    assert!(said.contains("READONLY"), "{said}");

    replica.cli(&["CONFIG", "SET", "replica-serve-stale-data", "no"]);
    master.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !replica
        .cli(&["INFO", "replication"])
        .contains("master_link_status:down")
    {
        assert!(std::time::Instant::now() < deadline, "the replica notices");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let backend = RedisBackend::new(&replica.url()).unwrap();
    let error = RedisStore::new(backend.clone())
        .load(&key)
        .await
        .unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    let said = format!("{:?}", backend.status().last_error).to_uppercase();
    assert!(said.contains("MASTERDOWN"), "{said}");
}

/// What the backend last heard from Redis, in capitals.
fn said(backend: &RedisBackend) -> String {
    format!("{:?}", backend.status().last_error).to_uppercase()
}

/// Redis loading its dataset (after a restart) answers `LOADING` to everything: an outage, so
/// the stores fall back, until the load is done.
#[tokio::test]
async fn a_redis_loading_its_dataset_is_an_outage_until_it_is_done() {
    use tower_turnstile::session::{RedisStore, SessionKey, SessionStore};
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    // 400 keys of 1.2 kB, loaded 10 ms each: 4 s of `LOADING`, the server answering between
    // keys.
    let fill = "for n = 1, 400 do redis.call('SET', 'filler:' .. n, string.rep('x', 1200)) end";
    server.cli(&["EVAL", fill, "0"]);
    server.cli(&["SAVE"]);
    let backend = RedisBackend::new(&server.url()).unwrap();
    backend.ping().await.expect("Redis answers");

    server.restart_loading_slowly(Duration::from_millis(10));
    let key = SessionKey::from_hash(&tower_turnstile::tenant::Tenant::default(), &"A".repeat(43))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let error = loop {
        // The first call may still find the old connection closed: it reconnects.
        match RedisStore::new(backend.clone()).load(&key).await {
            Err(error) if said(&backend).contains("LOADING") => {
                break error;
            }
            _ => assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                backend.status()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.is_outage(), "{error:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while backend.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "Redis answers again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "400");
}

/// A cluster node that serves no slot answers `CLUSTERDOWN` to every keyed command: an outage.
#[tokio::test]
async fn a_cluster_that_serves_no_slot_is_an_outage() {
    use tower_turnstile::session::{RedisStore, SessionKey, SessionStore};
    let Some(server) = RedisServer::start_configured(&["--cluster-enabled", "yes"]) else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    let key = SessionKey::from_hash(&tower_turnstile::tenant::Tenant::default(), &"A".repeat(43))
        .unwrap();
    let error = RedisStore::new(backend.clone())
        .load(&key)
        .await
        .unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    assert!(said(&backend).contains("CLUSTERDOWN"), "{}", said(&backend));
}
