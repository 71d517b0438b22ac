//! [`build`]: the app a [`Config`] describes. The storage comes first, then what follows from
//! it: the cookie settings, the rate limit, the registry of live connections, the routes.

use std::time::Duration;

use axum::Router;
use tower_turnstile::{
    connection::Registry,
    ratelimit::{ClientIp, Policy, RateLimitLayer},
    session::{CleanupTask, FailurePolicy, FallbackStore, SessionEvents, SessionLayer, SigningKey},
};
use tracing::info;

use super::{
    Config, Connections, HealthSource, StartupError, app_with,
    storage::{postgres_store, redis_backend, session_storage},
};

/// How often expired sessions are deleted from PostgreSQL.
const CLEANUP_EVERY: Duration = Duration::from_secs(300);

/// The app and what its shutdown needs.
#[derive(Debug)]
pub struct Built {
    /// The routes with every layer.
    pub router: Router,
    /// The session store that journals writes during a Redis outage, when Redis alone is used.
    pub fallback: Option<FallbackStore>,
    /// The deletion of expired sessions from PostgreSQL, while the app runs.
    pub cleanup: Option<CleanupTask>,
    /// The live `/ws` connections, to drain on shutdown.
    pub connections: Registry,
}

/// Builds the app `config` describes: picks and logs the session storage, then wires [`app`].
///
/// Must run inside a Tokio runtime (the Redis connection needs one). It never waits for Redis
/// to be up: an unreachable Redis is logged, and the app serves in degraded mode until it
/// answers.
///
/// [`app`]: super::app
pub async fn build(config: &Config) -> Result<Router, StartupError> {
    Ok(build_parts(config).await?.router)
}

/// [`build`], also handing back the session fallback store (to flush it on shutdown).
pub async fn build_parts(config: &Config) -> Result<Built, StartupError> {
    let redis = redis_backend(config)?;
    let database = match &config.database_url {
        None => None,
        Some(url) => Some(postgres_store(url).await?),
    };
    let (sessions, health) = session_storage(redis, database).await;
    let rate_limit = rate_limit_layer(config, &health);
    let sessions = cookie_settings(sessions, config)?;
    let fallback = health.fallback();
    let cleanup = health
        .database()
        .map(|database| database.spawn_cleanup(CLEANUP_EVERY));
    let registry = connection_registry(&health)?;
    let events = match health.redis() {
        Some(backend) => SessionEvents::redis(backend.clone()),
        None => SessionEvents::memory(),
    };
    let connections = Connections {
        registry: registry.clone(),
        max_per_user: config.ws_max_per_user,
        events,
    };
    Ok(Built {
        router: app_with(sessions, rate_limit, health, connections),
        fallback,
        cleanup,
        connections: registry,
    })
}

/// The per-client-IP limit of every route but `/health`, counted in Redis when the sessions
/// are (one limit for all instances), with a local limiter while Redis is unreachable.
fn rate_limit_layer(config: &Config, health: &HealthSource) -> RateLimitLayer {
    // Validated in `Config::from_vars`; a config built by hand with bad proxies trusts none.
    let key = ClientIp::trusting(&config.trusted_proxies).unwrap_or_else(|_| ClientIp::peer());
    let policy = Policy::new("per-ip", config.rate_limit)
        .expect("a constant, valid policy name")
        .with_key(key);
    let policy = match config.rate_limit_penalty {
        Some(penalty) => {
            info!(
                ?penalty,
                "repeat offenders are blocked (RATE_LIMIT_PENALTY)"
            );
            policy.with_penalty(penalty)
        }
        None => policy,
    };
    let layer = RateLimitLayer::new(policy).with_shadow(config.rate_limit_shadow);
    if config.rate_limit_shadow {
        info!("the rate limit is a shadow (RATE_LIMIT_SHADOW): it counts, and refuses nobody");
    }
    info!(quota = %config.rate_limit, trusted_proxies = ?config.trusted_proxies, "rate limit per client IP");
    match health.redis() {
        Some(backend) => layer.with_redis(backend.clone()),
        None => layer,
    }
}

/// The session cookie as `config` asks for it, signed when `SESSION_SECRET` is set.
fn cookie_settings(sessions: SessionLayer, config: &Config) -> Result<SessionLayer, StartupError> {
    // The anonymous counter keeps a persistent cookie (it survives a browser restart); a login
    // chooses its own cookie kind (`remember=1`).
    // While Redis is down, a session this instance holds no copy of reads as none, and a write
    // to it starts a new session, as for a forged id: no input gets a `5xx`. A write the app
    // cannot keep at all (a full journal) answers `503`, never a `200` with a value that was
    // not stored.
    let mut sessions = sessions
        .with_secure(config.cookie_secure)
        .with_persistent_cookie(true)
        .with_failure_policy(
            FailurePolicy::fail_closed_on_write().with_restart_when_unavailable(true),
        );
    match &config.session_secret {
        Some(secret) => {
            let key = SigningKey::from_secret(secret).map_err(StartupError::SigningKey)?;
            sessions = sessions.with_signing_key(key);
            info!("session cookies are signed (SESSION_SECRET)");
        }
        None => info!("session cookies are unsigned (SESSION_SECRET is unset)"),
    }
    if let Some(max) = config.max_sessions_per_user {
        sessions = sessions.with_max_sessions_per_user(max);
        info!(
            max,
            "at most this many sessions per user: a login beyond ends the oldest"
        );
    }
    if !config.cookie_secure {
        info!("session cookies lack `Secure` (COOKIE_SECURE=0): plain-http development only");
    }
    Ok(sessions)
}

/// Where `/ws` registers its connections: in Redis, across instances, when the app has Redis.
fn connection_registry(health: &HealthSource) -> Result<Registry, StartupError> {
    match health.redis() {
        Some(backend) => {
            info!("live /ws connections are registered in Redis, across instances");
            Registry::new(backend.clone()).map_err(StartupError::Registry)
        }
        None => {
            info!("live /ws connections are known to this instance only (no Redis)");
            Ok(Registry::local())
        }
    }
}
