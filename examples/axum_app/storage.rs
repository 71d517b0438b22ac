//! Where sessions live: in memory, in Redis with a local fallback, in PostgreSQL, or in
//! PostgreSQL with copies in Redis. [`HealthSource`] names the one in use, for `/health` and
//! for the parts that follow from it (the fallback to flush, the cleanup, the registry).

use std::time::Duration;

use tower_turnstile::{
    backend::RedisBackend,
    session::{ChainStore, FallbackStore, MemoryStore, PostgresStore, RedisStore, SessionLayer},
};
use tracing::{info, warn};

use super::{Config, StartupError, error_chain};

/// What `/health` reports on.
#[derive(Debug, Clone)]
pub enum HealthSource {
    /// No Redis: sessions are in memory.
    Disabled,
    /// The Redis backend the sessions use, and their fallback store when the app built one.
    Redis(RedisBackend, Option<FallbackStore>),
    /// Sessions in PostgreSQL, rate limits in memory.
    Postgres(PostgresStore),
    /// Sessions in PostgreSQL with copies in Redis, rate limits in Redis.
    Chain(RedisBackend, PostgresStore),
}

impl HealthSource {
    /// The Redis backend, when Redis is used.
    pub(crate) fn redis(&self) -> Option<&RedisBackend> {
        match self {
            Self::Redis(backend, _) | Self::Chain(backend, _) => Some(backend),
            Self::Disabled | Self::Postgres(_) => None,
        }
    }

    /// The store that journals session writes during a Redis outage, when Redis alone is used.
    pub(crate) fn fallback(&self) -> Option<FallbackStore> {
        match self {
            Self::Redis(_, fallback) => fallback.clone(),
            Self::Disabled | Self::Postgres(_) | Self::Chain(..) => None,
        }
    }

    /// The PostgreSQL store, when sessions live there.
    pub(crate) fn database(&self) -> Option<&PostgresStore> {
        match self {
            Self::Postgres(database) | Self::Chain(_, database) => Some(database),
            Self::Disabled | Self::Redis(..) => None,
        }
    }
}

/// The Redis backend the settings name: a cluster, else a Sentinel-managed master, else
/// `REDIS_URL`; none without any of them.
pub(crate) fn redis_backend(config: &Config) -> Result<Option<RedisBackend>, StartupError> {
    match (
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
    .map_err(StartupError::Redis)
}

/// The session store on `DATABASE_URL`. The connection is made on first use, so a database
/// that is down at start is logged and retried, as Redis is: its table is created as soon as
/// the database answers.
pub(crate) async fn postgres_store(url: &str) -> Result<PostgresStore, StartupError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StartupError::Invalid {
            variable: "DATABASE_URL",
            value: url.split('@').next_back().unwrap_or_default().to_owned(),
            expected: "a postgres:// or postgresql:// URL",
        });
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(url)
        .map_err(StartupError::Database)?;
    let store = PostgresStore::new(pool);
    match store.migrate().await {
        Ok(()) => info!("PostgreSQL answers; the session table is ready"),
        Err(error) => {
            warn!(
                error = %error_chain(&error),
                "PostgreSQL does not answer yet; sessions degrade until it does"
            );
            let retrying = store.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if retrying.migrate().await.is_ok() {
                        info!("PostgreSQL answers; the session table is ready");
                        return;
                    }
                }
            });
        }
    }
    Ok(store)
}

/// The session layer on whichever of Redis and PostgreSQL the app has, logging the choice.
pub(crate) async fn session_storage(
    redis: Option<RedisBackend>,
    database: Option<PostgresStore>,
) -> (SessionLayer, HealthSource) {
    match (redis, database) {
        (None, None) => in_memory(),
        (None, Some(database)) => in_postgres(database),
        (Some(backend), database) => {
            log_first_ping(&backend).await;
            match database {
                Some(database) => in_postgres_with_redis_copies(backend, database),
                None => in_redis(backend),
            }
        }
    }
}

fn in_memory() -> (SessionLayer, HealthSource) {
    info!("sessions are kept in memory (REDIS_URL and DATABASE_URL are unset): one instance only");
    (
        SessionLayer::new(MemoryStore::new()),
        HealthSource::Disabled,
    )
}

fn in_postgres(database: PostgresStore) -> (SessionLayer, HealthSource) {
    info!(
        "sessions are kept in PostgreSQL (DATABASE_URL); rate limits are counted in memory, \
         per instance (set REDIS_URL to share them)"
    );
    (
        SessionLayer::new(database.clone()),
        HealthSource::Postgres(database),
    )
}

/// Says whether Redis answers at start, and warns when it may evict sessions (the backend's
/// check logs that); the app serves either way.
async fn log_first_ping(backend: &RedisBackend) {
    let status = backend.check().await;
    let target = status.target;
    if status.healthy {
        info!(%target, "Redis answers");
    } else {
        warn!(
            %target,
            error = status.last_error.unwrap_or_default(),
            "Redis does not answer yet; the app serves without it until it does"
        );
    }
}

fn in_postgres_with_redis_copies(
    backend: RedisBackend,
    database: PostgresStore,
) -> (SessionLayer, HealthSource) {
    info!(
        "sessions are kept in PostgreSQL with copies in Redis; while Redis is \
         unreachable they are served from PostgreSQL alone"
    );
    let store = ChainStore::new(RedisStore::new(backend.clone()), database.clone());
    (
        SessionLayer::new(store),
        HealthSource::Chain(backend, database),
    )
}

fn in_redis(backend: RedisBackend) -> (SessionLayer, HealthSource) {
    info!(
        "sessions are kept in Redis; while it is unreachable, they are served from \
         a local copy and writes are journaled; if it comes back without its data, the \
         sessions this instance served are written back"
    );
    // A copy of the sessions this instance served, kept coherent by Redis and never served
    // (reads stay on Redis), written back if Redis comes back without its data.
    let store = FallbackStore::new(
        RedisStore::new(backend.clone()).with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY),
    );
    let health = HealthSource::Redis(backend, Some(store.clone()));
    (SessionLayer::new(store), health)
}
