//! Whether Redis has lost its data since this backend last looked: a marker key with no TTL,
//! created at first contact by whichever instance comes first, and read back after each
//! reconnect. A marker gone, or replaced by another instance's, means Redis came back without
//! what it held (a restart without persistence, a failover to a replica that had not synced):
//! the loss's *generation* moves on, and the stores that keep copies write them back.

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
    /// Reads the marker (creating it when it is absent) and returns how many times Redis has
    /// been found to have lost its data. One round trip, under `deadline`. The first read
    /// ever finds no loss: there was nothing to lose yet.
    pub(crate) async fn data_losses(
        &self,
        deadline: std::time::Duration,
    ) -> Result<u64, BackendError> {
        let token = fresh_value();
        let (created, value): (Value, Option<String>) = self
            .run(deadline, |mut conn| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(MARKER_KEY)
                    .arg(&token)
                    .arg("NX")
                    .cmd("GET")
                    .arg(MARKER_KEY)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let created = matches!(created, Value::Okay);
        let mut seen = lock(&self.inner.marker.seen);
        let lost = match &seen.value {
            // The first look: nothing was known before.
            None => false,
            // Gone (this backend just wrote it again), or another instance's since.
            Some(before) => created || value.as_deref() != Some(before.as_str()),
        };
        if lost {
            seen.generation += 1;
            tracing::warn!(
                target: "tower_turnstile::backend",
                redis = %self.inner.target,
                "Redis has lost its data (its marker key is gone): restarted without \
                 persistence, or failed over to a replica that had not synced"
            );
        }
        seen.value = value;
        Ok(seen.generation)
    }
}
