//! Whether Redis may have lost data since this backend last looked.
//!
//! - **All of it**: a marker key with no TTL, created at first contact by whichever instance
//!   comes first, is read back after each reconnect. A marker gone, or replaced by another
//!   instance's, means Redis came back without what it held (a restart without persistence).
//! - **The latest writes**: the server's `run_id` (`INFO server`) changed while the marker
//!   stayed. Another server process answers now: a restart that reloaded its files (which may
//!   miss the last second of writes), or a failover to a replica that may not have received
//!   the last writes before it was promoted.
//!
//! Either way the loss's *generation* moves on, and the stores that keep copies write back
//! what Redis no longer holds. On a Cluster only the marker is read: each shard has a run id
//! of its own, and a pipeline reaches one of them.

use std::sync::Mutex;

use redis::Value;

use super::{BackendError, RedisBackend};
use crate::sync::lock;

/// The marker's key. It has no TTL and is tiny; every instance on the Redis shares it.
const MARKER_KEY: &str = "turnstile:marker";

/// What the backend knows of the marker.
#[derive(Debug, Default)]
pub(super) struct Marker {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// The marker's value when last read, if ever.
    value: Option<String>,
    /// The server's `run_id` when last read, if ever (never on a Cluster).
    run_id: Option<String>,
    /// Losses found so far.
    generation: u64,
}

/// A value for a new marker: a fresh one each time, so that every instance that read the old
/// one sees the change, whoever writes the new one.
fn fresh_value() -> String {
    let mut bytes = [0u8; 8];
    // The clock would do as well: the value only needs to differ from the last one.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = crate::time::now_millis().to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RedisBackend {
    /// Reads the marker (creating it when it is absent) and the server's run id, and returns
    /// how many times Redis has been found to have lost data. One round trip, under
    /// `deadline`. The first read ever finds no loss: there was nothing to lose yet.
    pub(crate) async fn data_losses(
        &self,
        deadline: std::time::Duration,
    ) -> Result<u64, BackendError> {
        let token = fresh_value();
        let with_run_id = !self.is_cluster();
        let (created, value, info): (Value, Option<String>, Option<String>) = self
            .run(deadline, |mut conn| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("SET").arg(MARKER_KEY).arg(&token).arg("NX");
                pipe.cmd("GET").arg(MARKER_KEY);
                if with_run_id {
                    pipe.cmd("INFO").arg("server");
                    pipe.query_async(&mut conn).await
                } else {
                    let (created, value) = pipe.query_async(&mut conn).await?;
                    Ok((created, value, None))
                }
            })
            .await?;
        let created = matches!(created, Value::Okay);
        let run_id = info.as_deref().and_then(run_id_in).map(str::to_owned);
        let mut seen = lock(&self.inner.marker.seen);
        let lost_all = match &seen.value {
            // The first look: nothing was known before.
            None => false,
            // Gone (this backend just wrote it again), or another instance's since.
            Some(before) => created || value.as_deref() != Some(before.as_str()),
        };
        let moved = matches!((&seen.run_id, &run_id), (Some(before), Some(now)) if before != now);
        if lost_all {
            tracing::warn!(
                target: "tower_turnstile::backend",
                redis = %self.inner.target,
                "Redis has lost its data (its marker key is gone): restarted without \
                 persistence, or failed over to a replica that had not synced"
            );
        } else if moved {
            tracing::info!(
                target: "tower_turnstile::backend",
                redis = %self.inner.target,
                "another Redis server process answers (restarted, or failed over): the \
                 latest writes may be lost; sessions held here that it lacks are written back"
            );
        }
        if lost_all || moved {
            seen.generation += 1;
        }
        seen.value = value;
        if run_id.is_some() {
            seen.run_id = run_id;
        }
        Ok(seen.generation)
    }
}

/// The `run_id` in the text of an `INFO server` reply.
fn run_id_in(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(str::trim)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::run_id_in;

    #[test]
    fn reads_the_run_id_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:5f1c0a\r\ntcp_port:6379\r\n";
        assert_eq!(run_id_in(info), Some("5f1c0a"));
        assert_eq!(run_id_in("# Server\r\nrun_id:\r\n"), None);
        assert_eq!(run_id_in("garbage"), None);
    }
}
