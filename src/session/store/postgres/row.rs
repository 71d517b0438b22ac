//! Rows and their values: how a record is bound into a statement and read back from a row, and
//! what a database error means.

use std::{collections::BTreeMap, time::Duration};

use sqlx::{Row, postgres::PgRow};

use crate::{
    session::store::{Record, SessionKey, StoreError},
    time::millis,
};

/// A `u64` for a `bigint` column, held to its range.
pub(super) fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Binds a whole row, in the column order of the create and cycle statements: tenant, id,
/// user, data, created, absolute end, inactivity timeout, cookie kind.
pub(super) fn bind_row<'q>(
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
pub(super) fn json_object<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
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
pub(super) fn read_record(row: &PgRow) -> Result<Option<Record>, sqlx::Error> {
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
pub(super) fn error(error: sqlx::Error) -> StoreError {
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
