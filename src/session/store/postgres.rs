//! Sessions in PostgreSQL: one row per session, its data one `jsonb` object written field by
//! field.

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{PgPool, Row, postgres::PgRow};

use super::{Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written};
use crate::{
    tenant::Tenant,
    time::{from_unix_millis, millis},
};

/// Now on the database's clock, in Unix milliseconds: every instance decides expiry on the same
/// clock, as Redis's `TIME` does for the Redis store.
const NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// A row whose data is not a JSON object is no session: written by something else, or damaged.
const WELL_FORMED: &str = "jsonb_typeof(data) = 'object'";

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

/// A table name [`PostgresStore::try_with_table`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid table name {0:?}: use `table` or `schema.table`, each part 1 to 63 lower-case \
     letters, digits or `_`, not starting with a digit"
)]
pub struct TableNameError(pub String);

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
    pub fn try_with_table(mut self, table: &str) -> Result<Self, TableNameError> {
        let valid_part = |part: &str| {
            (1..=63).contains(&part.len())
                && !part.starts_with(|c: char| c.is_ascii_digit())
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|part| valid_part(part)) {
            return Err(TableNameError(table.to_owned()));
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

    /// Deletes at most one batch of expired rows; returns how many went.
    pub async fn cleanup_batch(&self) -> Result<u64, StoreError> {
        let done = self
            .deadline(
                sqlx::query(&self.sql.cleanup)
                    .bind(self.cleanup_batch)
                    .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes every expired row, one batch at a time; returns how many went.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = self.cleanup_batch().await?;
            deleted += batch;
            if batch < u64::try_from(self.cleanup_batch).unwrap_or(u64::MAX) {
                return Ok(deleted);
            }
            // Let other work have the table between batches.
            tokio::task::yield_now().await;
        }
    }

    /// Runs [`cleanup`](Self::cleanup) every `interval` (the first pass at once) until the
    /// returned handle is dropped. Failures are logged and the next pass tries again.
    #[must_use = "the cleanup stops when the handle is dropped"]
    pub fn spawn_cleanup(&self, interval: Duration) -> CleanupTask {
        let store = self.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match store.cleanup().await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::debug!(
                        target: "tower_turnstile::session",
                        deleted,
                        "expired sessions deleted from PostgreSQL"
                    ),
                    Err(error) => tracing::warn!(
                        target: "tower_turnstile::session",
                        error = %error,
                        source = std::error::Error::source(&error).map(ToString::to_string),
                        "session cleanup failed; the next pass tries again"
                    ),
                }
            }
        });
        CleanupTask { task }
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

    /// [`SessionStore::load`], with the row's version (one more at every write).
    pub(crate) async fn load_versioned(
        &self,
        key: &SessionKey,
    ) -> Result<Option<(Record, i64)>, StoreError> {
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

    /// The version of a live session, without reading or sliding it.
    pub(crate) async fn version(&self, key: &SessionKey) -> Result<Option<i64>, StoreError> {
        self.deadline(
            sqlx::query_scalar(&self.sql.version)
                .bind(key.tenant().as_str())
                .bind(key.hash())
                .fetch_optional(&self.pool),
        )
        .await
    }

    /// The generation of the session copies kept in front of this store.
    pub(crate) async fn cache_generation(&self) -> Result<i64, StoreError> {
        let generation: Option<i64> = self
            .deadline(sqlx::query_scalar(&self.sql.generation).fetch_one(&self.pool))
            .await?;
        Ok(generation.unwrap_or(0))
    }

    /// Makes every copy kept in front of this store stale; returns the new generation.
    pub(crate) async fn bump_cache_generation(&self) -> Result<i64, StoreError> {
        let generation: Option<i64> = self
            .deadline(sqlx::query_scalar(&self.sql.bump_generation).fetch_optional(&self.pool))
            .await?;
        Ok(generation.unwrap_or(0))
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

/// The background cleanup of [`PostgresStore::spawn_cleanup`]; dropping it stops the task.
#[derive(Debug)]
pub struct CleanupTask {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CleanupTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The store's statements, written once for its table.
#[derive(Debug)]
struct Statements {
    table: String,
    migration: String,
    load: String,
    slide: String,
    create: String,
    update: String,
    cycle: String,
    delete: String,
    list: String,
    delete_user: String,
    cleanup: String,
    version: String,
    generation: String,
    bump_generation: String,
}

impl Statements {
    fn new(table: &str) -> Self {
        let t = table;
        // Index names live in the table's schema; derive them from the table's own name.
        let base = table.rsplit('.').next().unwrap_or(table);
        let columns = "tenant, id, user_id, data, created_at, expires_at, idle_ms, idle_until, \
                       persistent";
        let insert_values = format!("$1, $2, $3, $4::jsonb, $5, $6, $7, LEAST({NOW} + $7, $6), $8");
        let on_conflict = format!(
            "ON CONFLICT (tenant, id) DO UPDATE SET user_id = EXCLUDED.user_id, \
             data = EXCLUDED.data, created_at = EXCLUDED.created_at, \
             expires_at = EXCLUDED.expires_at, idle_ms = EXCLUDED.idle_ms, \
             idle_until = EXCLUDED.idle_until, persistent = EXCLUDED.persistent, \
             version = {t}.version + 1"
        );
        Self {
            table: t.to_owned(),
            migration: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n\
                 \x20   tenant     text    NOT NULL,\n\
                 \x20   id         text    NOT NULL, -- SHA-256 of the session id, base64url\n\
                 \x20   user_id    text,\n\
                 \x20   data       jsonb   NOT NULL DEFAULT '{{}}',\n\
                 \x20   created_at bigint  NOT NULL, -- Unix ms\n\
                 \x20   expires_at bigint  NOT NULL, -- absolute end, Unix ms\n\
                 \x20   idle_ms    bigint  NOT NULL, -- inactivity timeout\n\
                 \x20   idle_until bigint  NOT NULL, -- LEAST(last use + idle_ms, expires_at)\n\
                 \x20   persistent boolean NOT NULL,\n\
                 \x20   version    bigint  NOT NULL DEFAULT 1, -- one more at every write\n\
                 \x20   PRIMARY KEY (tenant, id)\n\
                 );\n\
                 CREATE INDEX IF NOT EXISTS {base}_user ON {t} (tenant, user_id) \
                 WHERE user_id IS NOT NULL;\n\
                 CREATE INDEX IF NOT EXISTS {base}_idle_until ON {t} (idle_until);\n\
                 -- One row: the generation of the session copies a Redis chain keeps.\n\
                 CREATE TABLE IF NOT EXISTS {t}_cache (generation bigint NOT NULL);\n\
                 INSERT INTO {t}_cache (generation) \
                 SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM {t}_cache);\n"
            ),
            // A plain read, which also says whether the slide is due: it is, once the deadline
            // fell behind by more than idle_ms / 16, and then `slide` moves it.
            load: format!(
                "SELECT user_id, data::text AS data, created_at, expires_at, idle_ms, persistent, \
                        version, {WELL_FORMED} AS well_formed, \
                        LEAST({NOW} + idle_ms, expires_at) - idle_until > idle_ms / 16 AS due \
                 FROM {t} WHERE tenant = $1 AND id = $2 AND idle_until > {NOW}"
            ),
            slide: format!(
                "UPDATE {t} SET idle_until = LEAST({NOW} + idle_ms, expires_at) \
                 WHERE tenant = $1 AND id = $2 AND idle_until > {NOW}"
            ),
            create: format!("INSERT INTO {t} ({columns}) VALUES ({insert_values}) {on_conflict}"),
            // $3 the keys to set (a JSON object), $4 the keys to remove, $5..$7 a new
            // lifetime (NULL: unchanged). A bad row under the key is deleted on the way.
            update: format!(
                "WITH bad AS (\
                   DELETE FROM {t} WHERE tenant = $1 AND id = $2 AND NOT {WELL_FORMED}), \
                 changed AS (\
                   UPDATE {t} SET data = (data || $3::jsonb) - $4::text[], \
                     idle_ms = COALESCE($5, idle_ms), \
                     expires_at = COALESCE($6, expires_at), \
                     persistent = COALESCE($7, persistent), \
                     idle_until = LEAST({NOW} + COALESCE($5, idle_ms), COALESCE($6, expires_at)), \
                     version = version + 1 \
                   WHERE tenant = $1 AND id = $2 AND idle_until > {NOW} AND {WELL_FORMED} \
                   RETURNING idle_until > {NOW} AS alive) \
                 SELECT alive FROM changed"
            ),
            // $1, $2 the old key; $3..$10 the new row. The new row is written only if the
            // old one was live, in the same statement.
            cycle: format!(
                "WITH old AS (\
                   DELETE FROM {t} WHERE tenant = $1 AND id = $2 \
                   RETURNING idle_until > {NOW} AND {WELL_FORMED} AS live), \
                 moved AS (\
                   INSERT INTO {t} ({columns}) \
                   SELECT $3, $4, $5, $6::jsonb, $7, $8, $9, LEAST({NOW} + $9, $8), $10 \
                   WHERE EXISTS (SELECT 1 FROM old WHERE live) \
                   {on_conflict} RETURNING 1) \
                 SELECT count(*) AS moved FROM moved"
            ),
            delete: format!("DELETE FROM {t} WHERE tenant = $1 AND id = $2"),
            list: format!(
                "SELECT id, created_at, expires_at FROM {t} \
                 WHERE tenant = $1 AND user_id = $2 AND idle_until > {NOW} AND {WELL_FORMED}"
            ),
            delete_user: format!(
                "WITH gone AS (\
                   DELETE FROM {t} WHERE tenant = $1 AND user_id = $2 \
                   RETURNING idle_until > {NOW} AND {WELL_FORMED} AS live) \
                 SELECT count(*) FILTER (WHERE live) AS ended FROM gone"
            ),
            cleanup: format!(
                "DELETE FROM {t} USING (\
                   SELECT tenant, id FROM {t} WHERE idle_until <= {NOW} \
                   LIMIT $1 FOR UPDATE SKIP LOCKED) AS expired \
                 WHERE {t}.tenant = expired.tenant AND {t}.id = expired.id"
            ),
            version: format!(
                "SELECT version FROM {t} WHERE tenant = $1 AND id = $2 AND idle_until > {NOW}"
            ),
            generation: format!("SELECT max(generation) FROM {t}_cache"),
            bump_generation: format!(
                "UPDATE {t}_cache SET generation = generation + 1 RETURNING generation"
            ),
        }
    }
}

/// A `u64` for a `bigint` column, held to its range.
fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Binds a whole row, in the column order of the create and cycle statements: tenant, id,
/// user, data, created, absolute end, inactivity timeout, cookie kind.
fn bind_row<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    key: &SessionKey,
    record: &Record,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(key.tenant().as_str().to_owned())
        .bind(key.hash())
        .bind(record.user.clone())
        .bind(json_object(&record.data))
        .bind(big(record.created_at))
        .bind(big(record.expires_at))
        .bind(big(millis(record.inactivity_timeout)))
        .bind(record.persistent)
}

/// A JSON object of these keys and values (JSON text already).
fn json_object<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut object = String::from("{");
    for (i, (key, value)) in pairs.into_iter().enumerate() {
        if i > 0 {
            object.push(',');
        }
        // A string always serializes.
        object.push_str(&serde_json::to_string(key).unwrap_or_default());
        object.push(':');
        object.push_str(value);
    }
    object.push('}');
    object
}

/// The record of a loaded row, or `None` when the row is no session.
fn read_record(row: &PgRow) -> Result<Option<Record>, sqlx::Error> {
    if !row.try_get::<bool, _>("well_formed")? {
        return Ok(None);
    }
    let text: String = row.try_get("data")?;
    let Ok(values) = serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&text) else {
        return Ok(None);
    };
    let unsigned = |name: &str| -> Result<u64, sqlx::Error> {
        Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
    };
    Ok(Some(Record {
        data: values
            .into_iter()
            .map(|(key, value)| (key, value.to_string()))
            .collect(),
        user: row.try_get("user_id")?,
        created_at: unsigned("created_at")?,
        expires_at: unsigned("expires_at")?,
        inactivity_timeout: Duration::from_millis(unsigned("idle_ms")?),
        persistent: row.try_get("persistent")?,
    }))
}

/// Connection trouble, a pool that cannot hand out a connection, or a server shutting down or
/// refusing connections is an outage; anything else the database answered is a failure.
fn error(error: sqlx::Error) -> StoreError {
    let outage = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exception; 57P01..57P03: shutdown, crash, cannot connect now;
        // 53300: too many connections.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    };
    if outage {
        StoreError::Unavailable {
            source: Box::new(error),
        }
    } else {
        StoreError::Failed {
            source: Box::new(error),
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
