//! Sessions in PostgreSQL: one row per session, its data one `jsonb` object written field by
//! field.

//!
//! - `sql`: the statements, kept as data in `sql/*.sql`.
//! - `row`: how a record is bound into a statement and read back, and what an error means.
//! - `cleanup`: deleting expired rows in batches, by hand or from a task.

mod cleanup;
mod row;
mod sql;

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{PgPool, Row};

pub use self::cleanup::CleanupTask;
use self::{
    row::{big, bind_row, error, json_object, read_record},
    sql::{Statements, valid_table},
};
use super::{
    Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, VersionedStore,
    Written,
};
use crate::{
    ConfigError,
    tenant::Tenant,
    time::{from_unix_millis, millis},
};

/// Sessions in PostgreSQL, on a pool the application hands in (an axum app usually has one).
///
/// - **One row per session**, keyed by tenant and the SHA-256 of the id (never the id), with
///   the user (indexed, for "log out everywhere"), the creation time, the absolute end, the
///   inactivity timeout, the deadline it gives, and the cookie kind.
/// - **Field-level saves**: the data is one `jsonb` object, and a save sends only the changed
///   keys (`data || changes - removed`) under the row's lock, so two requests changing
///   different keys of one session both keep their change.
/// - **One round trip** for a save, a create, a login (`cycle`: the old row removed and the
///   new one written in one statement, so an id that is gone stays gone), a destroy, listing
///   and revoking a user's sessions, and for a read: a `SELECT` that also says whether the
///   inactivity deadline is due to move.
/// - **Expiry on the database's clock.** A read never returns an expired session. The deadline
///   is due to move once it has fallen behind by more than a sixteenth of the timeout; the read
///   then sends one `UPDATE` more. So most reads write nothing (a plain `SELECT` is about a
///   third faster than one that may write), a session in use never expires, and an unused one
///   expires between 15/16 of its timeout and its timeout after its last use. Saves always
///   move it.
/// - **Cleanup**: expired rows stay invisible until [`cleanup`](Self::cleanup) (or the task of
///   [`spawn_cleanup`](Self::spawn_cleanup)) deletes them, in batches of at most
///   [`with_cleanup_batch`](Self::with_cleanup_batch) rows, each its own short statement.
/// - **Bad rows** (data that is not a JSON object) read as no session and are deleted; a save
///   to one answers [`Written::Missing`], so the layer starts a new session.
///
/// Values are kept as `jsonb`: they come back as equal JSON, in its compact form, with object
/// keys possibly in another order.
///
/// The table is created by [`migrate`](Self::migrate), or by the SQL of
/// [`migration_sql`](Self::migration_sql) for teams that manage their schema themselves.
///
#[cfg_attr(feature = "axum", doc = "```no_run")]
#[cfg_attr(not(feature = "axum"), doc = "```ignore")]
/// use std::time::Duration;
/// use tower_turnstile::session::{PostgresStore, SessionLayer};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://127.0.0.1/app").await?;
/// let sessions = PostgresStore::new(pool);
/// sessions.migrate().await?;
/// // Expired rows go every five minutes, until `cleanup` is dropped.
/// let cleanup = sessions.spawn_cleanup(Duration::from_secs(300));
/// let app = axum::Router::<()>::new().layer(SessionLayer::new(sessions));
/// # drop((app, cleanup));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    timeout: Duration,
    cleanup_batch: i64,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .field("timeout", &self.timeout)
            .field("cleanup_batch", &self.cleanup_batch)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Sessions in the table `turnstile_sessions` (in the pool's `search_path`), with a
    /// deadline of one second per statement and cleanup batches of 1000 rows.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new("turnstile_sessions")),
            timeout: Duration::from_secs(1),
            cleanup_batch: 1000,
        }
    }

    /// Keeps sessions in another table: `table` or `schema.table`.
    pub fn try_with_table(mut self, table: &str) -> Result<Self, ConfigError> {
        if !valid_table(table) {
            return Err(ConfigError::TableName(table.to_owned()));
        }
        self.sql = Arc::new(Statements::new(table));
        Ok(self)
    }

    /// The longest one statement may take before the store reports the database unavailable
    /// (acquiring a connection included). Default: one second.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The most rows one cleanup statement deletes. Default: 1000. Smaller batches hold their
    /// locks for less time; a pass runs as many as it needs.
    pub fn with_cleanup_batch(mut self, rows: usize) -> Self {
        self.cleanup_batch = i64::try_from(rows.max(1)).unwrap_or(i64::MAX);
        self
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The SQL that creates the table and its indexes (idempotent), for teams that manage
    /// their schema themselves. [`migrate`](Self::migrate) runs the same.
    pub fn migration_sql(&self) -> String {
        self.sql.migration.clone()
    }

    /// Creates the table and its indexes unless they exist. Safe to run from several instances
    /// at once (they take turns on an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // Several statements in one simple query run as one transaction, so the advisory lock
        // is held until the last of them is done.
        let script = format!(
            "SELECT pg_advisory_xact_lock(hashtext('tower-turnstile migration'));\n{}",
            self.sql.migration
        );
        sqlx::raw_sql(&script)
            .execute(&self.pool)
            .await
            .map_err(error)?;
        Ok(())
    }

    /// Asks the database for one trivial answer, within the store's deadline: for health
    /// checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.deadline(sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .map(|_| ())
    }

    async fn deadline<T>(
        &self,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, query).await {
            Ok(result) => result.map_err(error),
            Err(_) => Err(StoreError::Unavailable {
                source: format!("PostgreSQL did not answer within {:?}", self.timeout).into(),
            }),
        }
    }

    async fn remove_bad_row(&self, key: &SessionKey) {
        tracing::warn!(
            target: "tower_turnstile::session",
            session = %key.hash(),
            "session row in PostgreSQL is not a JSON object; treated as no session and removed"
        );
        let removed = self
            .deadline(
                sqlx::query(&self.sql.delete)
                    .bind(key.tenant().as_str())
                    .bind(key.hash())
                    .execute(&self.pool),
            )
            .await;
        if let Err(error) = removed {
            tracing::warn!(target: "tower_turnstile::session", error = %error, "removing a bad session row failed");
        }
    }
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        Ok(self.load_versioned(key).await?.map(|(record, _)| record))
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        let query = bind_row(sqlx::query(&self.sql.create), key, record);
        self.deadline(query.execute(&self.pool)).await?;
        Ok(())
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        let lifetime = patch.lifetime;
        let alive: Option<bool> = self
            .deadline(
                sqlx::query_scalar(&self.sql.update)
                    .bind(key.tenant().as_str())
                    .bind(key.hash())
                    .bind(json_object(patch.set.iter().map(|(k, v)| (k, v))))
                    .bind(&patch.remove)
                    .bind(lifetime.map(|l| big(millis(l.inactivity_timeout))))
                    .bind(lifetime.map(|l| big(l.expires_at)))
                    .bind(lifetime.map(|l| l.persistent))
                    .fetch_optional(&self.pool),
            )
            .await?;
        match alive {
            None => Ok(Written::Missing),
            Some(true) => Ok(Written::Applied),
            // The change ended the session's life.
            Some(false) => {
                self.delete(key, None).await?;
                Ok(Written::Missing)
            }
        }
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        _old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        let query = sqlx::query(&self.sql.cycle)
            .bind(old.tenant().as_str())
            .bind(old.hash());
        let row = self
            .deadline(bind_row(query, new, record).fetch_one(&self.pool))
            .await?;
        let moved: i64 = row.try_get("moved").map_err(error)?;
        Ok(if moved > 0 {
            Written::Applied
        } else {
            Written::Missing
        })
    }

    async fn delete(&self, key: &SessionKey, _user: Option<&str>) -> Result<(), StoreError> {
        self.deadline(
            sqlx::query(&self.sql.delete)
                .bind(key.tenant().as_str())
                .bind(key.hash())
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        let rows = self
            .deadline(
                sqlx::query(&self.sql.list)
                    .bind(user.tenant().as_str())
                    .bind(user.user())
                    .fetch_all(&self.pool),
            )
            .await?;
        let tenant: &Tenant = user.tenant();
        let mut sessions = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id").map_err(error)?;
            let at = |name: &str| -> Result<u64, StoreError> {
                let ms: i64 = row.try_get(name).map_err(error)?;
                Ok(u64::try_from(ms).unwrap_or(0))
            };
            // A row with an id that is no hash was not written by this store: skip it.
            let Some(key) = SessionKey::from_hash(tenant, &id) else {
                continue;
            };
            sessions.push(SessionInfo {
                key,
                created_at: from_unix_millis(at("created_at")?),
                expires_at: from_unix_millis(at("expires_at")?),
            });
        }
        Ok(sessions)
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let ended: i64 = self
            .deadline(
                sqlx::query_scalar(&self.sql.delete_user)
                    .bind(user.tenant().as_str())
                    .bind(user.user())
                    .fetch_one(&self.pool),
            )
            .await?;
        Ok(usize::try_from(ended).unwrap_or(0))
    }
}

#[async_trait]
impl VersionedStore for PostgresStore {
    async fn load_versioned(&self, key: &SessionKey) -> Result<Option<(Record, i64)>, StoreError> {
        let row = self
            .deadline(
                sqlx::query(&self.sql.load)
                    .bind(key.tenant().as_str())
                    .bind(key.hash())
                    .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        match read_record(&row).map_err(error)? {
            Some(record) => {
                if row.try_get::<bool, _>("due").map_err(error)? {
                    self.deadline(
                        sqlx::query(&self.sql.slide)
                            .bind(key.tenant().as_str())
                            .bind(key.hash())
                            .execute(&self.pool),
                    )
                    .await?;
                }
                Ok(Some((record, row.try_get("version").map_err(error)?)))
            }
            None => {
                self.remove_bad_row(key).await;
                Ok(None)
            }
        }
    }

    async fn version(&self, key: &SessionKey) -> Result<Option<i64>, StoreError> {
        self.deadline(
            sqlx::query_scalar(&self.sql.version)
                .bind(key.tenant().as_str())
                .bind(key.hash())
                .fetch_optional(&self.pool),
        )
        .await
    }

    async fn copy_generation(&self) -> Result<i64, StoreError> {
        let generation: Option<i64> = self
            .deadline(sqlx::query_scalar(&self.sql.generation).fetch_one(&self.pool))
            .await?;
        Ok(generation.unwrap_or(0))
    }

    async fn next_copy_generation(&self) -> Result<i64, StoreError> {
        let generation: Option<i64> = self
            .deadline(sqlx::query_scalar(&self.sql.bump_generation).fetch_optional(&self.pool))
            .await?;
        Ok(generation.unwrap_or(0))
    }
}
