//! What a backend can say about itself: its breaker, its last outage, its counters.

use std::{sync::atomic::Ordering, time::SystemTime};

use serde::Serialize;

use super::{BreakerState, RedisBackend};
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
        }
    }

    /// Pings Redis when the breaker would let a call through (closed, or open long enough for
    /// a probe), then returns the state. A service with no traffic still sees its breaker
    /// close again this way once Redis is back.
    pub async fn check(&self) -> BackendStatus {
        // The outcome is recorded by the breaker; the status reports it.
        let _ = self.ping().await;
        self.status()
    }
}
