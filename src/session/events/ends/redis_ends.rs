//! The index of possible ends in Redis: a sorted set of session hashes by end, a hash of their
//! inactivity timeouts and users (both tagged with the tenant: one slot on a Cluster), and the
//! set of tenants to sweep.

use redis::Value;

use crate::{
    StoreError, backend::RedisBackend, session::events::redis_log::TIMEOUT, tenant::Tenant,
};

/// The tenant's sorted set of ends and hash of infos.
type Keys = (String, String);

pub(super) async fn schedule(
    backend: &RedisBackend,
    (ends, info): Keys,
    tenants: Option<String>,
    tenant: &Tenant,
    hash: &str,
    end_at: u64,
    text: &str,
) -> Result<(), StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD").arg(ends).arg(end_at).arg(hash).ignore();
    pipe.cmd("HSET").arg(info).arg(hash).arg(text).ignore();
    backend.query_pipeline::<()>(TIMEOUT, pipe).await?;
    if let Some(tenants) = tenants {
        let mut add = redis::cmd("SADD");
        add.arg(tenants).arg(tenant.as_str());
        backend.query::<Value>(TIMEOUT, add).await?;
    }
    Ok(())
}

pub(super) async fn unschedule(
    backend: &RedisBackend,
    (ends, info): Keys,
    hashes: &[String],
) -> Result<(), StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("ZREM").arg(ends).arg(hashes).ignore();
    pipe.cmd("HDEL").arg(info).arg(hashes).ignore();
    backend.query_pipeline::<()>(TIMEOUT, pipe).await?;
    Ok(())
}

pub(super) async fn tenants(backend: &RedisBackend, key: &str) -> Result<Vec<Tenant>, StoreError> {
    let mut cmd = redis::cmd("SMEMBERS");
    cmd.arg(key);
    let names: Vec<String> = backend.query(TIMEOUT, cmd).await?;
    Ok(names
        .iter()
        .filter_map(|name| Tenant::new(name).ok())
        .collect())
}

/// Up to `count` hashes whose end is at or before `now`, each with its info.
pub(super) async fn due(
    backend: &RedisBackend,
    (ends, info): Keys,
    now: u64,
    count: usize,
) -> Result<Vec<(String, Option<String>)>, StoreError> {
    let mut range = redis::cmd("ZRANGE");
    range
        .arg(&ends)
        .arg("-inf")
        .arg(now)
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(count);
    let hashes: Vec<String> = backend.query(TIMEOUT, range).await?;
    if hashes.is_empty() {
        return Ok(Vec::new());
    }
    let mut get = redis::cmd("HMGET");
    get.arg(info).arg(&hashes);
    let infos: Vec<Option<String>> = backend.query(TIMEOUT, get).await?;
    Ok(hashes.into_iter().zip(infos).collect())
}

/// Moves a live session's next look to `at`, if it is still in the index.
pub(super) async fn reschedule(
    backend: &RedisBackend,
    ends: &str,
    hash: &str,
    at: u64,
) -> Result<(), StoreError> {
    let mut cmd = redis::cmd("ZADD");
    cmd.arg(ends).arg("XX").arg(at).arg(hash);
    backend.query::<Value>(TIMEOUT, cmd).await?;
    Ok(())
}

/// `ZREM`s `hash`: true for the one caller that removed it.
pub(super) async fn claim(
    backend: &RedisBackend,
    (ends, info): Keys,
    hash: &str,
) -> Result<bool, StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("ZREM").arg(ends).arg(hash);
    pipe.cmd("HDEL").arg(info).arg(hash).ignore();
    let (removed,): (i64,) = backend.query_pipeline(TIMEOUT, pipe).await?;
    Ok(removed == 1)
}
