//! The lifecycle log in Redis: one capped stream per tenant.

use std::time::Duration;

use redis::Value;

use super::{Fields, LifecycleEvent, LifecycleKind};
use crate::{
    StoreError,
    backend::{RedisBackend, stream},
    tenant::Tenant,
};

/// The deadline of each call to the log and to its index of ends.
pub(in crate::session::events) const TIMEOUT: Duration = Duration::from_millis(500);

/// `XADD` of one event, trimming the stream to about `max_len`.
pub(super) async fn append(
    backend: &RedisBackend,
    key: &str,
    max_len: usize,
    fields: Fields<'_>,
) -> Result<(), StoreError> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("MAXLEN").arg("~").arg(max_len).arg("*");
    cmd.arg("k").arg(fields.kind.as_str());
    if let Some(user) = fields.user {
        cmd.arg("u").arg(user);
    }
    cmd.arg("s")
        .arg(fields.session)
        .arg("i")
        .arg(fields.instance)
        .arg("at")
        .arg(fields.at);
    backend.query::<Value>(TIMEOUT, cmd).await?;
    Ok(())
}

pub(super) async fn latest(
    backend: &RedisBackend,
    key: &str,
    tenant: &Tenant,
    count: usize,
) -> Result<Vec<LifecycleEvent>, StoreError> {
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(key).arg("+").arg("-").arg("COUNT").arg(count);
    let mut events = query(backend, cmd, tenant).await?;
    events.reverse();
    Ok(events)
}

pub(super) async fn since(
    backend: &RedisBackend,
    key: &str,
    tenant: &Tenant,
    after: &str,
    count: usize,
) -> Result<Vec<LifecycleEvent>, StoreError> {
    let start = match after {
        "" | "0" | "0-0" => "-".to_owned(),
        after => format!("({after}"),
    };
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(start).arg("+").arg("COUNT").arg(count);
    query(backend, cmd, tenant).await
}

pub(super) async fn read_group(
    backend: &RedisBackend,
    key: &str,
    tenant: &Tenant,
    group: &str,
    consumer: &str,
    count: usize,
) -> Result<Vec<LifecycleEvent>, StoreError> {
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM");
    let created = backend.query::<Value>(TIMEOUT, create).await;
    match created {
        Ok(_) => {}
        // The group exists already.
        Err(error) if format!("{error:?}").contains("BUSYGROUP") => {}
        Err(error) => return Err(error.into()),
    }
    // Delivered to this consumer before and not acknowledged, then new ones.
    for from in ["0", ">"] {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        cmd.arg("STREAMS").arg(key).arg(from);
        let reply = backend.query::<Value>(TIMEOUT, cmd).await?;
        let events = parse(stream::read_entries(reply), tenant);
        if !events.is_empty() {
            return Ok(events);
        }
    }
    Ok(Vec::new())
}

pub(super) async fn ack(
    backend: &RedisBackend,
    key: &str,
    group: &str,
    ids: &[String],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("XACK");
    cmd.arg(key).arg(group).arg(ids);
    backend.query::<Value>(TIMEOUT, cmd).await?;
    Ok(())
}

async fn query(
    backend: &RedisBackend,
    cmd: redis::Cmd,
    tenant: &Tenant,
) -> Result<Vec<LifecycleEvent>, StoreError> {
    let reply = backend.query::<Value>(TIMEOUT, cmd).await?;
    Ok(parse(stream::entries(reply), tenant))
}

/// The events among stream entries; entries that are not events of ours are skipped.
fn parse(entries: Vec<stream::Entry>, tenant: &Tenant) -> Vec<LifecycleEvent> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            Some(LifecycleEvent {
                kind: LifecycleKind::from_name(&field("k")?)?,
                tenant: tenant.clone(),
                user: field("u"),
                session: field("s").unwrap_or_default(),
                instance: field("i").unwrap_or_default(),
                at: field("at")?.parse().ok()?,
                id,
            })
        })
        .collect()
}
