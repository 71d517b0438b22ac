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
