//! Redis that answers but will not take writes now: out of memory (`OOM`, with
//! `maxmemory-policy noeviction`). Reads keep going to Redis; a write fails with
//! [`BackendError::WritesRefused`](super::BackendError::WritesRefused), which the stores report
//! as unavailable (the fallback store journals the write and replays it later), and the health
//! report says Redis is `degraded` until a probe write is taken again.
//!
//! The errors that mean no command will be served now (`READONLY` from a demoted master,
//! `MASTERDOWN`, `LOADING`) stay outages: those take every call, reads included, to the
//! fallback.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use redis::RedisError;

use super::RedisBackend;
use crate::sync::lock;

/// The key a health check writes, while writes are refused, to learn whether they are taken
/// again. It lives for a second.
const PROBE_KEY: &str = "turnstile:write-probe";

/// Whether `error` is Redis refusing a write it would take with more memory, alone, in a
/// pipeline, or as the reason a transaction was aborted.
pub(super) fn refuses_writes(error: &RedisError) -> bool {
    error.code() == Some("OOM")
        || error
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == "OOM"))
}

/// What the backend knows of refused writes.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// Writes refused since the backend was built.
    count: AtomicU64,
    /// Whether Redis refused a write and has not taken a probe write since.
    now: AtomicBool,
    /// The last refusal: Redis's message, and when.
    last: Mutex<Option<(String, SystemTime)>>,
}

/// The refused writes, as the health report shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RefusalView {
    pub(super) count: u64,
    pub(super) now: bool,
    pub(super) last: Option<String>,
}

impl Refusals {
    pub(super) fn record(&self, error: &RedisError) {
        let first = !self.now.swap(true, Ordering::AcqRel);
        self.count.fetch_add(1, Ordering::Relaxed);
        let message = error.to_string();
        if first {
            tracing::warn!(
                target: "tower_turnstile::backend",
                error = %message,
                "Redis refuses writes; reads still go to Redis, and writes fall back until it \
                 takes them again"
            );
        }
        *lock(&self.last) = Some((message, SystemTime::now()));
    }

    pub(super) fn view(&self) -> RefusalView {
        RefusalView {
            count: self.count.load(Ordering::Relaxed),
            now: self.now.load(Ordering::Acquire),
            last: lock(&self.last)
                .as_ref()
                .map(|(message, _)| message.clone()),
        }
    }
}

impl RedisBackend {
    /// While writes are refused, writes a probe key that expires in a second: if Redis takes
    /// it, it takes writes again. Nothing is written while writes are taken.
    pub(super) async fn probe_writes(&self) {
        if !self.inner.refusals.now.load(Ordering::Acquire) {
            return;
        }
        let taken = self
            .run(std::time::Duration::from_secs(1), |mut conn| async move {
                redis::cmd("SET")
                    .arg(PROBE_KEY)
                    .arg(1)
                    .arg("PX")
                    .arg(1000)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
            .is_ok();
        if taken && self.inner.refusals.now.swap(false, Ordering::AcqRel) {
            tracing::info!(
                target: "tower_turnstile::backend",
                "Redis takes writes again"
            );
        }
    }
}
