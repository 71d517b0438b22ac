//! Where sessions live: [`HealthSource`] names the storage in use, for `/health` and for the
//! parts that follow from it (the fallback to flush, the cleanup, the registry).

use std::time::Duration;

use tower_turnstile::{
    backend::Health,
    session::{FallbackStore, PostgresStore},
};
use tracing::{info, warn};

use super::{StartupError, error_chain};

/// What `/health` reports on.
#[derive(Debug, Clone)]
pub enum HealthSource {
    /// No Redis: sessions are in memory.
    Disabled,
    /// The Redis backend the sessions use, and their fallback store when the app built one.
    Redis(Health, Option<FallbackStore>),
    /// Sessions in PostgreSQL, rate limits in memory.
    Postgres(PostgresStore),
    /// Sessions in PostgreSQL with copies in Redis, rate limits in Redis.
    Chain(Health, PostgresStore),
}

impl HealthSource {
    /// The Redis backend's health, when Redis is used.
    pub(crate) fn redis(&self) -> Option<&Health> {
        match self {
            Self::Redis(health, _) | Self::Chain(health, _) => Some(health),
            Self::Disabled | Self::Postgres(_) => None,
        }
    }
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
