//! [`build`]: the app a [`Config`] describes. The storage comes first, then what follows from
//! it: the cookie settings, the rate limit, the registry of live connections, the routes.

use std::time::Duration;

use axum::Router;
use tower_turnstile::{
    backend::RedisBackend,
    connection::Registry,
    ratelimit::{ClientIp, Policy, RateLimitLayer},
    session::{
        ChainStore, FallbackStore, MemoryStore, RedisStore, SessionLayer, SigningKey,
        store::CleanupTask,
    },
};
use tracing::{info, warn};

use super::{
    Config, Connections, HealthSource, StartupError, app_with, error_chain, storage::postgres_store,
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
    let redis = match (
        &config.redis_cluster,
        &config.redis_sentinel,
        &config.redis_url,
    ) {
        (Some(seeds), _, _) => Some(RedisBackend::cluster(seeds.iter().cloned())),
        (None, Some(sentinel), _) => Some(RedisBackend::sentinel(
            &sentinel.master,
            sentinel.urls.iter().cloned(),
        )),
        (None, None, Some(url)) => Some(RedisBackend::new(url)),
        (None, None, None) => None,
    }
    .transpose()
    .map_err(StartupError::Redis)?;
    let database = match &config.database_url {
        None => None,
        Some(url) => Some(postgres_store(url).await?),
    };
    let (sessions, health) = match (redis, database) {
        (None, None) => {
            info!(
                "sessions are kept in memory (REDIS_URL and DATABASE_URL are unset): one instance only"
            );
            (
                SessionLayer::new(MemoryStore::new()),
                HealthSource::Disabled,
            )
        }
        (None, Some(database)) => {
            info!(
                "sessions are kept in PostgreSQL (DATABASE_URL); rate limits are counted in memory, \
                 per instance (set REDIS_URL to share them)"
            );
            (
                SessionLayer::new(database.clone()),
                HealthSource::Postgres(database),
            )
        }
        (Some(backend), database) => {
            let target = backend.health().snapshot().target;
            match backend.ping().await {
                Ok(()) => info!(%target, "Redis answers"),
                Err(error) => warn!(
                    %target,
                    error = %error_chain(&error),
                    "Redis does not answer yet; the app serves without it until it does"
                ),
            }
            match database {
                Some(database) => {
                    info!(
                        "sessions are kept in PostgreSQL with copies in Redis; while Redis is \
                         unreachable they are served from PostgreSQL alone"
                    );
                    let store = ChainStore::new(RedisStore::new(backend.clone()), database.clone());
                    (
                        SessionLayer::new(store),
                        HealthSource::Chain(backend.health(), database),
                    )
                }
                None => {
                    info!(
                        "sessions are kept in Redis; while it is unreachable, they are served from \
                         a local copy and writes are journaled"
                    );
                    let store = FallbackStore::new(RedisStore::new(backend.clone()));
                    let health = HealthSource::Redis(backend.health(), Some(store.clone()));
                    (SessionLayer::new(store), health)
                }
            }
        }
    };
    let rate_limit = rate_limit_layer(config, &health);
    // The anonymous counter keeps a persistent cookie (it survives a browser restart); a login
    // chooses its own cookie kind (`remember=1`).
    // While Redis is down, a session this instance holds no copy of reads as none, and a write
    // to it starts a new session, as for a forged id: no input gets a `5xx`. A write the app
    // cannot keep at all (a full journal) answers `503`, never a `200` with a value that was
    // not stored.
    let mut sessions = sessions
        .with_secure(config.cookie_secure)
        .with_persistent_cookie(true)
        .with_restart_when_unavailable(true)
        .with_fail_closed_on_write(true);
    match &config.session_secret {
        Some(secret) => {
            let key = SigningKey::from_secret(secret).map_err(StartupError::SigningKey)?;
            sessions = sessions.with_signing_key(key);
            info!("session cookies are signed (SESSION_SECRET)");
        }
        None => info!("session cookies are unsigned (SESSION_SECRET is unset)"),
    }
    if !config.cookie_secure {
        info!("session cookies lack `Secure` (COOKIE_SECURE=0): plain-http development only");
    }
    let fallback = match &health {
        HealthSource::Redis(_, fallback) => fallback.clone(),
        _ => None,
    };
    let cleanup = match &health {
        HealthSource::Postgres(database) | HealthSource::Chain(_, database) => {
            Some(database.spawn_cleanup(CLEANUP_EVERY))
        }
        _ => None,
    };
    let registry = match health.redis() {
        Some(health) => {
            info!("live /ws connections are registered in Redis, across instances");
            Registry::new(health.backend().clone()).map_err(StartupError::Registry)?
        }
        None => {
            info!("live /ws connections are known to this instance only (no Redis)");
            Registry::local()
        }
    };
    let connections = Connections {
        registry: registry.clone(),
        max_per_user: config.ws_max_per_user,
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
    let layer = RateLimitLayer::new(policy);
    info!(quota = %config.rate_limit, trusted_proxies = ?config.trusted_proxies, "rate limit per client IP");
    match health.redis() {
        Some(health) => layer.with_redis(health.backend().clone()),
        None => layer,
    }
}
