//! The reference app: an axum service whose sessions live in Redis (or in memory), scoped per
//! tenant. Its routes and behaviour are a contract: outside tests drive it over plain HTTP.
//!
//! Run it with `cargo run --release --example axum_app --features full`, then for instance:
//!
//! ```text
//! curl -i -c jar -b jar -X POST http://localhost:3000/counter
//! curl -i -c jar -b jar -d user=alice http://acme.localhost:3000/login
//! curl -i -c jar -b jar -d 'user=alice&remember=1' http://acme.localhost:3000/login
//! ```
//!
//! `POST /login` binds the session to `user` and changes its id; with `remember=1` the new
//! cookie is persistent (`Max-Age`), without it a browser-session cookie. `GET /` lists every
//! route.
//!
//! With `REDIS_URL`, sessions go through a `FallbackStore`: during a Redis outage they are
//! served from this instance's local copy and writes are journaled, then replayed. A session
//! this instance holds no copy of is treated as no session while Redis is down: its writes
//! start a new session (a forged id never gets a `5xx`), and only a write the app cannot keep
//! at all (a full journal) answers `503`. `/health` reports it (`fallback_active`,
//! `sessions`), and a stop waits up to five seconds for journaled writes to reach Redis.
//!
//! With `DATABASE_URL` (a PostgreSQL URL), sessions live in PostgreSQL: alone, with rate limits
//! counted in memory per instance; with a Redis setting as well, in a `ChainStore` (Redis copies
//! in front of the database, which serves alone while Redis is down). The app creates its table
//! and deletes expired rows every five minutes.
//!
//! Configuration comes from the environment (see [`Config::from_vars`]): `BIND`, `REDIS_URL`,
//! `DATABASE_URL`,
//! `REDIS_CLUSTER_URLS` (seed nodes of a Redis Cluster) or `REDIS_SENTINEL_MASTER` with
//! `REDIS_SENTINEL_URLS` (a Sentinel-managed master), each used instead of `REDIS_URL`,
//! `SESSION_SECRET`, `COOKIE_SECURE`, `RATE_LIMIT`, `TRUSTED_PROXIES`, `WS_MAX_PER_USER` and
//! `MAX_SESSIONS_PER_USER` (a login beyond it ends the user's oldest session; its `/ws`
//! sockets close, as they do on every logout, on any instance). `REDIS_ENABLED=0` (or
//! `false`) ignores every Redis variable: the app runs in memory (or on `DATABASE_URL` alone),
//! and `/health` says `"redis": "disabled"`.
//!
//! `GET /metrics` serves the crate's metrics in the Prometheus text format (every counter from
//! the start; names and meanings in the crate docs, "Metrics"). Like `/health`, it is outside
//! the tenant, rate-limit and session layers.
//!
//! # Layout
//!
//! - `main.rs`: this map, `main`, and the server loop: serve until Ctrl-C or SIGTERM, tell live
//!   `/ws` connections to reconnect elsewhere, flush journaled session writes.
//! - `config.rs`: [`Config`], the environment's variables read and checked.
//! - `error.rs`: [`StartupError`], why the app could not start.
//! - `storage.rs`: where sessions live (memory, Redis, PostgreSQL, both), and [`HealthSource`],
//!   which of them is in use.
//! - `build.rs`: [`build`] and [`build_parts`], the storage wired to the cookie settings, the
//!   rate limit, the registry of live connections and the routes.
//! - `routes.rs`: [`app`], the router and its layers, and the session routes.
//! - `ws.rs`: `/ws` and `/notify`, live connections across instances.
//! - `metrics.rs`: `/metrics`, the Prometheus recorder.
//! - `health.rs`: the `/health` report.
//!
//! The folder doubles as a module of the test crates `tests/it` (whose `reference_app` tests
//! drive [`app`] directly, and whose `connections` tests use [`build_parts`]) and `tests/drills`
//! (the fault drill). So the files name each other through `super::`, never `crate::`: in a
//! test, the crate is the test.

mod build;
mod config;
mod error;
mod health;
mod metrics;
mod routes;
mod storage;
mod ws;

use std::{error::Error as StdError, io, net::SocketAddr, process::ExitCode, time::Duration};

use tracing::{error, info, warn};

pub use build::{Built, build, build_parts};
pub use config::{Config, SentinelConfig, config_from_env};
pub use error::StartupError;
pub use routes::{app, app_with};
pub use storage::HealthSource;
pub use ws::Connections;

/// How long a stop waits for journaled session writes to reach Redis.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// `error` and its sources, joined with `: `, for one log line.
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Resolves on Ctrl-C or SIGTERM.
#[allow(dead_code)] // only `main` uses it
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    info!("shutting down: finishing in-flight requests");
}

/// Reads the environment, builds the app and serves it until Ctrl-C or SIGTERM.
#[allow(dead_code)] // unused when the tests include this file as a module
async fn run() -> Result<(), StartupError> {
    let config = config_from_env()?;
    let Built {
        router: app,
        fallback,
        cleanup: _cleanup,
        connections,
    } = build_parts(&config).await?;
    let listener = tokio::net::TcpListener::bind(&config.bind)
        .await
        .map_err(|source| StartupError::Bind {
            address: config.bind.clone(),
            source,
        })?;
    let address = listener.local_addr().map_err(StartupError::Serve)?;
    info!(%address, "listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        // Live /ws connections are told to reconnect elsewhere (close 1012), and leave the
        // registry at once, so the server's graceful stop does not wait on them.
        let told = connections.drain().await;
        info!(
            connections = told,
            "live connections told to reconnect elsewhere"
        );
    })
    .await
    .map_err(StartupError::Serve)?;
    if let Some(fallback) = fallback {
        // Writes journaled during an outage live in this process only: give them a last chance.
        let waiting = fallback.flush(SHUTDOWN_FLUSH).await;
        if waiting > 0 {
            warn!(
                waiting,
                "stopped with session writes that never reached Redis; they are lost"
            );
        }
    }
    info!("stopped");
    Ok(())
}

#[allow(dead_code)] // unused when the tests include this file as a module
#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(error = %error_chain(&error), "cannot run");
            ExitCode::FAILURE
        }
    }
}
