//! What a backend can say about itself: its breaker, its last outage, its counters.

use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{BreakerState, MemorySettings, RedisBackend};
use crate::time::unix_millis;

/// The state of a [`RedisBackend`] at one instant: its breaker, its last outage, its counters.
/// Serialises to the fields of the health report.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct BackendStatus {
    /// `true` while the breaker is closed and the last call succeeded.
    pub healthy: bool,
    /// The breaker's state.
    #[serde(serialize_with = "serialize_state")]
    pub state: BreakerState,
    /// When the breaker last opened or closed (Unix milliseconds in JSON).
    #[serde(serialize_with = "serialize_time")]
    pub since: SystemTime,
    /// Outages in a row (resets on success).
    pub consecutive_failures: u32,
    /// The last outage seen, if any.
    pub last_error: Option<String>,
    /// When the last outage was seen (Unix milliseconds in JSON).
    #[serde(serialize_with = "serialize_opt_time")]
    pub last_error_at: Option<SystemTime>,
    /// Calls that Redis answered.
    pub successes: u64,
    /// Calls that failed for an outage (timeout, refused or broken connection).
    pub failures: u64,
    /// Calls not attempted because the breaker was open.
    pub rejected: u64,
    /// Round trips sent to Redis.
    pub round_trips: u64,
    /// The Redis server, as `host:port/db` (no credentials).
    pub target: String,
    /// Writes Redis refused (out of memory) since the backend was built.
    pub writes_refused: u64,
    /// Whether Redis refused a write and has not taken one since (a [`RedisBackend::check`]
    /// tries one while this is so): reads still go to Redis, writes fall back.
    pub refusing_writes: bool,
    /// What Redis said when it last refused a write.
    pub last_write_refusal: Option<String>,
    /// Redis's memory limit and eviction policy, as the last [`RedisBackend::check`] read
    /// them; `None` before Redis first answered one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySettings>,
    /// The eviction policy, when Redis may evict sessions and rate-limit counters under
    /// memory pressure (see [`MemorySettings::eviction_risk`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eviction_risk: Option<String>,
}

fn serialize_state<S: serde::Serializer>(state: &BreakerState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

fn serialize_time<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(unix_millis(*time))
}

fn serialize_opt_time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.serialize_some(&unix_millis(*t)),
        None => s.serialize_none(),
    }
}

impl RedisBackend {
    /// The current state, without any I/O.
    pub fn status(&self) -> BackendStatus {
        let inner = &self.inner;
        let view = inner.breaker.view();
        let counters = &inner.breaker.counters;
        let memory = self.memory_settings();
        let refusals = inner.refusals.view();
        let (last_error, last_error_at) = match view.last_error {
            Some((error, at)) => (Some(error), Some(at)),
            None => (None, None),
        };
        BackendStatus {
            // A failed call makes Redis unhealthy at once, even before enough of them in a row
            // open the breaker.
            healthy: view.state == BreakerState::Closed && view.consecutive_failures == 0,
            state: view.state,
            since: view.since,
            consecutive_failures: view.consecutive_failures,
            last_error,
            last_error_at,
            successes: counters.successes.load(Ordering::Relaxed),
            failures: counters.failures.load(Ordering::Relaxed),
            rejected: counters.rejected.load(Ordering::Relaxed),
            round_trips: inner.round_trips.load(Ordering::Relaxed),
            target: inner.target.clone(),
            writes_refused: refusals.count,
            refusing_writes: refusals.now,
            last_write_refusal: refusals.last,
            eviction_risk: memory
                .as_ref()
                .and_then(MemorySettings::eviction_risk)
                .map(str::to_owned),
            memory,
        }
    }

    /// Pings Redis when the breaker would let a call through (closed, or open long enough for
    /// a probe), then returns the state. A service with no traffic still sees its breaker
    /// close again this way once Redis is back.
    ///
    /// The same round trip reads Redis's memory limit and eviction policy (`INFO memory`) into
    /// [`BackendStatus::memory`]; the first time they put sessions at risk of eviction, a
    /// warning is logged. Call it at start to hear of that then. While Redis refuses writes
    /// ([`BackendStatus::refusing_writes`]), a second round trip writes a key that lives for a
    /// second, to learn whether it takes writes again.
    pub async fn check(&self) -> BackendStatus {
        // The outcome is recorded by the breaker; the status reports it.
        let read = self
            .run(Duration::from_secs(1), |mut conn| async move {
                redis::pipe()
                    .cmd("PING")
                    .ignore()
                    .cmd("INFO")
                    .arg("memory")
                    .query_async::<(String,)>(&mut conn)
                    .await
            })
            .await;
        if let Ok((info,)) = read {
            self.memory_seen(&info);
            self.probe_writes().await;
        }
        self.status()
    }
}
